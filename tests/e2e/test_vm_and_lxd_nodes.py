"""LXD and QEMU workspaces through the CLI on a remote node reached over a
real sshd: create, up, exec, logs -f, down, destroy, and their failure cases.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import LXD_TEST_IMAGE
from tests.support.cli import BIN, Env, cli_env
from tests.support.sshd import SshServer

pytestmark = [pytest.mark.e2e, pytest.mark.sshd]

QEMU_STATE = Path("/var/lib/vendetta/qemu")


@dataclass(frozen=True)
class Case:
    provider: str
    section: str
    missing: str


CASES = [
    pytest.param(
        Case("lxd", f"lxd: {{image: {LXD_TEST_IMAGE}, cpu: 1, memory: 256M}}", "vendetta/absent"),
        marks=pytest.mark.lxd,
        id="lxd",
    ),
    pytest.param(
        Case("qemu", "qemu: {image: debian-12, cpu: 1, memory: 512M, disk: 2G}", "absent-guest"),
        marks=pytest.mark.qemu,
        id="qemu",
    ),
]


@pytest.fixture(scope="module", params=CASES)
def node(request: pytest.FixtureRequest) -> Iterator[tuple[Env, Case]]:
    case: Case = request.param
    with cli_env(prefix=f"vd-{case.provider}-") as e:
        e.nodes["n1"] = SshServer.start(e.home / "sshd", host="127.0.0.6")
        e.cli("server", "start")
        e.add_node("n1", e.nodes["n1"])
        yield e, case


def config(e: Env, case: Case, name: str, section: str | None = None) -> str:
    path = e.home / name / ".vendetta" / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"name: {name}\nprovider: {case.provider}\n{section or case.section}\n")
    return str(path)


def instances(case: Case) -> str:
    if case.provider == "lxd":
        return subprocess.run(
            ["lxc", "list", "--format", "csv", "-c", "n"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    return subprocess.run(
        ["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def test_node_reports_the_provider_ready(node: tuple[Env, Case]) -> None:
    e, case = node
    (p,) = [p for p in e.node("n1")["providers"] if p["name"] == case.provider]
    assert p["ready"], p
    status = e.cli("node", "status", "n1").stdout
    assert f"provider   {case.provider}" in status


def test_lifecycle_exec_logs(node: tuple[Env, Case]) -> None:
    e, case = node
    e.cli("workspace", "create", "vm1", "--remote", "n1", "--config", config(e, case, "vm1"))
    env_id = e.workspace("vm1")["environment_id"]
    up = e.cli("workspace", "up", "vm1")
    assert "running" in up.stdout
    run = e.cli("workspace", "exec", "vm1", "--", "sh", "-c", "echo inside-$((40+2)); uname -s")
    assert run.stdout.split() == ["inside-42", "Linux"]
    assert (
        e.cli("workspace", "exec", "vm1", "--", "sh", "-c", "exit 5", check=False).returncode == 5
    )

    follow = subprocess.Popen(
        [str(BIN / "vendetta"), "workspace", "logs", "vm1", "-f"],
        env=e.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(2)
        e.cli(
            "workspace", "exec", "vm1", "--", "sh", "-c", "echo marker-from-inside > /proc/1/fd/1"
        )
        assert follow.stdout is not None
        deadline = time.monotonic() + 60
        lines: list[str] = []
        while time.monotonic() < deadline:
            line = follow.stdout.readline()
            lines.append(line)
            if "marker-from-inside" in line:
                break
        assert any("marker-from-inside" in ln for ln in lines), lines[-5:]
        e.cli("workspace", "down", "vm1")
        assert follow.wait(timeout=60) == 0  # the stream ends when the workspace stops
    finally:
        follow.kill()
    assert e.workspace("vm1")["state"] == "WORKSPACE_STATE_STOPPED"
    e.cli("workspace", "destroy", "vm1")
    assert env_id not in instances(case) and "vm1" not in instances(case)
    if case.provider == "qemu":  # no overlay, console or seed left behind
        assert not [p for p in QEMU_STATE.glob("*") if "vm1" in p.name]


def test_connect_runs_a_command_and_refuses_a_terminal_honestly(node: tuple[Env, Case]) -> None:
    e, case = node
    e.cli("workspace", "create", "con", "--remote", "n1", "--config", config(e, case, "con"))
    e.cli("workspace", "up", "con")
    run = e.cli(
        "workspace", "connect", "con", "--", "sh", "-c", "echo in-$((1+1)); exit 6", check=False
    )
    assert (run.stdout, run.returncode) == ("in-2\n", 6)
    e.cli("workspace", "destroy", "con")


def test_missing_image_lists_what_the_node_has(node: tuple[Env, Case]) -> None:
    e, case = node
    section = case.section.replace(
        "debian-12" if case.provider == "qemu" else LXD_TEST_IMAGE, case.missing
    )
    out = e.fails(
        "workspace",
        "create",
        "nope",
        "--remote",
        "n1",
        "--config",
        config(e, case, "nope", section),
    )
    assert case.missing in out
    assert ("debian-12" if case.provider == "qemu" else LXD_TEST_IMAGE) in out
    assert json.loads(e.cli("workspace", "list", "--json").stdout) == []


def test_engine_down_is_reported(node: tuple[Env, Case]) -> None:
    e, case = node
    if case.provider == "lxd":
        wrapper = "env LXD_DIR=/nonexistent"
    else:
        wrapper = "env LIBVIRT_DEFAULT_URI=qemu:///system?socket=/nonexistent/libvirt-sock"
    server = e.nodes["n1"]
    e.cli(
        "node",
        "add",
        "down1",
        server.host,
        "--port",
        str(server.port),
        "--user",
        server.user,
        "--identity",
        str(server.client_key_path),
        "--yes",
        "--agent-command",
        f"{wrapper} {e.agent_command('down1')}",
    )
    (p,) = [p for p in e.node("down1")["providers"] if p["name"] == case.provider]
    assert not p["ready"] and p["detail"]
    out = e.fails(
        "workspace", "create", "wsd", "--remote", "down1", "--config", config(e, case, "wsd")
    )
    engine = "LXD" if case.provider == "lxd" else "libvirt"
    assert engine in out and ("start" in out or "running" in out), out
    assert json.loads(e.cli("workspace", "list", "--json").stdout) == []
