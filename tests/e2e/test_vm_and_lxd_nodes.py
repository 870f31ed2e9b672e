"""LXD and QEMU workspaces through the CLI on a remote node reached over a
real sshd: create, up, exec, logs -f, connect (a command, and a terminal
through the coordinator's Connect stream), down, destroy, and their failure cases.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
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


async def _terminal(e: Env, workspace: str) -> tuple[bytes, int]:
    """A login shell (no argv) on a terminal through the coordinator's Connect stream:
    type, resize, exit. What it printed and its exit code."""
    import grpc.aio

    from vendetta.v1 import common_pb2, coordinator_pb2_grpc

    queue: asyncio.Queue[common_pb2.AttachInput | None] = asyncio.Queue()
    size = common_pb2.TerminalSize(rows=30, cols=120)
    start = common_pb2.AttachStart(workspace=workspace, tty=True, size=size)

    async def requests() -> AsyncIterator[common_pb2.AttachInput]:
        yield common_pb2.AttachInput(start=start)
        while (msg := await queue.get()) is not None:
            yield msg

    out, code = bytearray(), -1

    async def read() -> None:
        nonlocal code
        sock = f"unix:{e.env['VENDETTA_HOME']}/coordinator.sock"
        async with grpc.aio.insecure_channel(sock) as channel:
            async for o in coordinator_pb2_grpc.CoordinatorStub(channel).Connect(requests()):
                if o.WhichOneof("output") == "stdout":
                    out.extend(o.stdout)
                elif o.WhichOneof("output") == "exit_code":
                    code = o.exit_code

    async def shows(text: bytes, within: float = 30) -> bool:
        deadline = time.monotonic() + within
        while text not in out and not reader.done():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return text in out

    def type_(text: bytes) -> None:
        queue.put_nowait(common_pb2.AttachInput(stdin=text))

    reader = asyncio.create_task(read())
    try:
        type_(b"echo in-$((2+3)); stty size\n")
        assert await shows(b"in-5") and await shows(b"30 120"), out.decode()
        queue.put_nowait(common_pb2.AttachInput(resize=common_pb2.TerminalSize(rows=20, cols=100)))
        # The resize and the keys may travel apart: ask again, for up to a minute (five
        # tries of 2 s were short for a guest on a busy machine).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            type_(b"stty size\n")
            if await shows(b"20 100", within=2):
                break
        type_(b"exit 4\n")
        await asyncio.wait_for(reader, 30)
    finally:
        queue.put_nowait(None)
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    return bytes(out), code


def test_connect_runs_a_command_and_opens_a_terminal(node: tuple[Env, Case]) -> None:
    e, case = node
    e.cli("workspace", "create", "con", "--remote", "n1", "--config", config(e, case, "con"))
    e.cli("workspace", "up", "con")
    run = e.cli(
        "workspace", "connect", "con", "--", "sh", "-c", "echo in-$((1+1)); exit 6", check=False
    )
    assert (run.stdout, run.returncode) == ("in-2\n", 6)
    out, code = asyncio.run(_terminal(e, "con"))
    assert b"20 100" in out and code == 4, (out.decode(), code)
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
    # The engine's own "not reachable" message, with how to start it, reaches the user.
    if case.provider == "lxd":
        assert "LXD daemon not reachable at unix:///nonexistent" in out, out
        assert "start it with `lxd --group lxd &`" in out, out
    else:
        assert "libvirt daemon not reachable at qemu:///system" in out, out
        assert "start it with `bash scripts/engine-qemu.sh`" in out, out
    assert json.loads(e.cli("workspace", "list", "--json").stdout) == []
