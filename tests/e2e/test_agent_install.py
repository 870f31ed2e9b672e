"""`node add` installs the agent over SSH: a node user with nothing of vendetta.

The node is this machine behind a real sshd whose sessions get a fresh HOME
(sshd's SetEnv), so the agent lands in that HOME's ~/.local/share and nothing
of this checkout is on the session's PATH. The bundle is built with pip on the
coordinator's side; the node installs it with no package index.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from common.version import PACKAGES, build_id_of, source_root
from tests.conftest import require
from tests.e2e.test_cli import write_config
from tests.support.cli import BIN, Env, cli_env, containers, wait_for
from tests.support.node_machine import NodeMachine, image_problem
from tests.support.sshd import SshServer
from vendetta.v1 import nodeagent_pb2, nodeagent_pb2_grpc

pytestmark = [pytest.mark.e2e, pytest.mark.docker, pytest.mark.sshd]


def _node_home(root: Path, path_dir: Path | None = None) -> Path:
    """A fresh home; with ``path_dir``, its shell's PATH is only that folder."""
    home = root / "home"
    home.mkdir(parents=True)
    if path_dir is not None:
        # Debian's bash reads ~/.bashrc in SSH sessions, as a user's profile would.
        (home / ".bashrc").write_text(f"export PATH={path_dir}\n")
    return home


def _add(e: Env, name: str, server: SshServer) -> list[str]:
    return [
        "node", "add", name, server.host, "--port", str(server.port), "--user", server.user,
        "--identity", str(server.client_key_path), "--yes",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with cli_env("vd-inst-") as e:
        home = _node_home(e.home / "n1")
        e.nodes["n1"] = SshServer.start(e.home / "sshd1", session_env={"HOME": str(home)})
        e.agent_dirs.append(home / ".local" / "state" / "vendetta-agent")
        e.cli("server", "start")
        yield e


def _install_dir(e: Env) -> Path:
    # The coordinator's build (this process's sources may have moved on since it started).
    build = str(e.node("n1")["agent_version"])
    return e.home / "n1" / "home" / ".local" / "share" / "vendetta" / "agent" / build


def test_node_add_installs_the_agent_and_runs_a_workspace(env: Env) -> None:
    added = env.cli(*_add(env, "n1", env.nodes["n1"]), timeout=600)
    assert "added" in added.stdout and "ready" in added.stdout, added.stdout
    installed = _install_dir(env)
    assert (installed / "bin" / "python").exists()
    # nothing half-done is left next to it
    assert not [p.name for p in installed.parent.iterdir() if p.name.startswith(".")]
    node = env.wait_node("n1", "ready")
    assert node["agent_version"] == installed.name
    providers = {p["name"]: p for p in node["providers"]}
    assert providers["docker"]["ready"], providers
    # qemu is listed whether or not libvirt-python could be built here: ready, or why not
    assert set(providers) == {"docker", "lxd", "qemu"}
    assert providers["qemu"]["ready"] or providers["qemu"]["detail"], providers["qemu"]
    assert (
        env.home / "n1" / "home" / ".local" / "state" / "vendetta-agent" / "agent.sock"
    ).stat().st_mode & 0o777 == 0o600

    cfg = write_config(env.home / "p1" / ".vendetta" / "config.yaml", "inst1")
    env.cli("workspace", "create", "inst1", "--remote", "n1", "--config", str(cfg))
    env.cli("workspace", "up", "inst1")
    run = env.cli("workspace", "exec", "inst1", "--", "sh", "-c", "echo hi-$((6*7))")
    assert run.stdout == "hi-42\n"
    env.cli("workspace", "destroy", "inst1")
    assert containers("inst1") == []


def test_reconnect_of_the_same_build_does_not_reinstall(env: Env) -> None:
    installed = _install_dir(env)
    before = installed.stat().st_mtime_ns, (installed / "pyvenv.cfg").stat().st_mtime_ns
    server = env.nodes["n1"]
    logins = server.log_path.read_text().count("Accepted publickey")
    server.kill_connections()
    # The node stays `ready` within its grace while the coordinator reconnects, so
    # wait_node alone returns at once, and `node test` then waited only 5 s for the
    # agent: wait for the coordinator's new login first (as test_node_keys does).
    wait_for(
        "the coordinator to log in again",
        lambda: server.log_path.read_text().count("Accepted publickey") > logins,
        within=90,
        show=server.log_tail,
    )
    env.wait_node("n1", "ready", within=90)
    assert env.cli("node", "test", "n1").returncode == 0
    after = installed.stat().st_mtime_ns, (installed / "pyvenv.cfg").stat().st_mtime_ns
    assert after == before
    assert sorted(p.name for p in installed.parent.iterdir()) == [installed.name]


@pytest.mark.parametrize(
    ("python3", "message"),
    [
        (None, "has no python3"),
        ('#!/bin/sh\necho "Python 3.8.10"\n', "has Python 3.8.10"),
    ],
    ids=["missing", "too-old"],
)
def test_node_without_a_supported_python3_is_refused(
    env: Env, python3: str | None, message: str
) -> None:
    name = "nopy" if python3 is None else "oldpy"
    root = env.home / name
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True)
    for tool in ("uname", "head"):
        (bin_dir / tool).symlink_to(f"/usr/bin/{tool}")
    if python3 is not None:
        (bin_dir / "python3").write_text(python3)
        (bin_dir / "python3").chmod(0o755)
    home = _node_home(root, path_dir=bin_dir)
    server = env.nodes[name] = SshServer.start(root / "sshd", session_env={"HOME": str(home)})
    out = env.fails(*_add(env, name, server))
    assert message in out, out
    assert "needs Python 3.11, 3.12, 3.13, 3.14 as `python3`" in out, out
    assert name not in {n["name"] for n in env.json("node", "list")}
    assert not (home / ".local" / "share" / "vendetta").exists()


def _wait(
    what: str,
    check: Callable[[], object],
    within: float = 120,
    show: Callable[[], object] | None = None,
) -> None:
    wait_for(what, check, within=within, show=show)


def _other_build(root: Path) -> tuple[Path, str]:
    """A copy of this checkout's packages with one line more: a build of its own (its
    build id is the digest of its sources), as an agent of another vendetta version."""
    other = root / "other-build"
    for package in PACKAGES:
        shutil.copytree(
            source_root() / package, other / package,
            ignore=shutil.ignore_patterns("__pycache__"),
        )  # fmt: skip
    version = other / "common" / "version.py"
    version.write_text(version.read_text() + "\n# another build (the upgrade test)\n")
    return other, build_id_of(other)


def _agent_services(state: Path, ws: str) -> dict[str, int]:
    """The services the agent at ``state`` supervises for ``ws``, asked on its socket."""

    async def ask() -> dict[str, int]:
        async with grpc.aio.insecure_channel(f"unix:{state / 'agent.sock'}") as channel:
            stub = nodeagent_pb2_grpc.NodeAgentStub(channel)
            request = nodeagent_pb2.EnvironmentRequest(workspace=ws, provider="docker")
            reply = await stub.GetServices(request, timeout=10)
            return {s.name: s.pid for s in reply.services}

    try:
        return asyncio.run(ask())
    except grpc.RpcError:
        return {}


def test_connect_replaces_an_agent_of_another_build_and_services_keep_running(
    env: Env,
) -> None:
    build = str(env.node("n1")["agent_version"])
    home = env.home / "n1" / "home"
    state = home / ".local" / "state" / "vendetta-agent"
    services = "services:\n  sleeper:\n    command: 'while :; do sleep 1; done'\n"
    ws = "upg1"
    cfg = write_config(env.home / ws / ".vendetta" / "config.yaml", ws, extra=services)
    # No code inside: this test is about the agent, not about shipping sources.
    env.cli("workspace", "create", ws, "--remote", "n1", "--config", str(cfg), "--no-source")
    env.cli("workspace", "up", ws)
    (service,) = env.workspace(ws)["services"]
    assert service["pid"], service
    (container,) = containers(ws)
    started = container.exec_run(["cat", f"/proc/{service['pid']}/stat"]).output.split()[21]

    # Another vendetta's agent takes the node over, as its `ensure` does: in the node
    # user's session environment, it stops the running agent and starts its own.
    other, other_build = _other_build(env.home / "n1-other")
    assert other_build != build
    taken = subprocess.run(
        [sys.executable, "-m", "nodeagent.main", "--dir", str(state), "ensure"],
        cwd=other, env={**env.env, "HOME": str(home), "PYTHONPATH": str(other)},
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    took = json.loads(taken.stdout.splitlines()[-1])
    assert took["version"] == other_build and took["started"], took
    assert took["runner"] == "detached", took  # no systemd on this machine
    _wait(
        "the other build's agent to find the service",
        lambda: _agent_services(state, ws).get("sleeper"),
    )
    assert _agent_services(state, ws) == {"sleeper": service["pid"]}

    env.nodes["n1"].kill_connections()  # the coordinator reconnects: the upgrade
    _wait(
        "the coordinator's build on n1",
        lambda: (
            (n := env.node("n1"))["state"] == "NODE_STATE_READY"
            and n["agent_version"] == build
            and _pid(state) not in (0, took["pid"])
        ),
        within=180,
    )
    _wait("the other agent to exit", lambda: not Path(f"/proc/{took['pid']}").exists())
    # The new agent found the service again (it resumes in the background after it
    # listens): the same process, not a new one.
    _wait(
        "the new agent to find the service",
        lambda: _agent_services(state, ws).get("sleeper"),
        within=120,
    )
    assert _agent_services(state, ws) == {"sleeper": service["pid"]}
    again = container.exec_run(["cat", f"/proc/{service['pid']}/stat"]).output.split()[21]
    assert again == started
    # And the coordinator shows it so, once its reconcile has read it from the new agent.
    _wait(
        "the service's state from the new agent",
        lambda: (
            [(s["name"], s["pid"]) for s in env.workspace(ws)["services"]]
            == [("sleeper", service["pid"])]
        ),
        within=120,
        show=lambda: (env.workspace(ws), env.node("n1"), _agent_services(state, ws)),
    )
    env.cli("workspace", "destroy", ws)


def _pid(state: Path) -> int:  # 0 while an agent is being replaced
    try:
        return int((state / "agent.pid").read_text())
    except (FileNotFoundError, ValueError):
        return 0


def test_ssh_dropped_mid_install_fails_clearly_and_a_retry_succeeds(env: Env) -> None:
    root = env.home / "n3"
    home = _node_home(root)
    server = env.nodes["n3"] = SshServer.start(root / "sshd", session_env={"HOME": str(home)})
    (tools,) = (env.home / "coord" / "bundles").glob("*/tools")  # built by the first test
    huge = tools / "zz-huge.bin"
    block = os.urandom(1 << 20)
    with huge.open("wb") as f:  # dense (SFTP skips the holes of sparse files): 1 GiB
        for _ in range(1024):
            f.write(block)
    try:
        add = subprocess.Popen(
            [str(BIN / "vendetta"), *_add(env, "n3", server)],
            env=env.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        agent = home / ".local" / "share" / "vendetta" / "agent"

        def sending() -> bool:  # the huge file is on its way
            return any(p.stat().st_size > 0 for p in agent.glob(".upload-*/tools/zz-huge.bin"))

        _wait("the upload", sending, within=300)
        server.kill_connections()
        out, _ = add.communicate(timeout=120)
    finally:
        huge.unlink()
    assert add.returncode != 0, out
    message = " ".join(out.split())
    assert "the SSH connection dropped while sending the agent bundle" in message, out
    assert "nothing was installed" in message, out
    assert "n3" not in {n["name"] for n in env.json("node", "list")}
    assert not [p for p in agent.iterdir() if not p.name.startswith(".")]

    again = env.cli(*_add(env, "n3", server), timeout=600)
    assert "added" in again.stdout and "ready" in again.stdout, again.stdout
    env.cli("node", "remove", "n3", "--purge")
    assert not agent.exists()


def _fill_when_the_upload_starts(machine: NodeMachine, share: str) -> subprocess.Popen[bytes]:
    """As root in the node: once an install's upload folder appears (after the install
    checked the free space), fill the disk up."""
    script = (
        f"while ! ls -d {share}/vendetta/agent/.upload-* >/dev/null 2>&1; do sleep 0.05; done; "
        f"dd if=/dev/zero of={share}/filler bs=1M 2>/dev/null; true"
    )
    return subprocess.Popen(["lxc", "exec", machine.name, "--", "sh", "-c", script])


@pytest.mark.lxd
def test_a_separate_machine_with_a_full_disk_then_gets_the_agent_and_remove_purge_takes_it_away(
    env: Env,
) -> None:
    problem = image_problem()
    require("the node image", not problem, problem)
    machine = NodeMachine.launch(env.home / "machine", user="vdnode")
    add = [
        "node", "add", "m1", machine.host, "--port", str(machine.port), "--user",
        machine.user, "--identity", str(machine.client_key_path), "--yes",
    ]  # fmt: skip
    share = "/home/vdnode/.local/share"  # where the agent is installed: its own small disk
    try:
        machine.exec(
            "sh", "-c", f"mkdir -p {share} && mount -t tmpfs -o size=8m tmpfs {share} && "
            f"chown vdnode:vdnode {share} {share}/..",
        )  # fmt: skip
        # Smaller than the bundle: refused before anything is sent.
        out = env.fails(*add)
        assert f"no space left on the node's disk at {share} (" in out, out
        assert "free some space there and retry" in out and "nothing was installed" in out, out
        assert "m1" not in {n["name"] for n in env.json("node", "list")}
        assert machine.exec("ls", "-A", share).split() == []

        # Room for the agent, but the disk fills up while it is installed.
        machine.exec("mount", "-o", "remount,size=160m", share)
        filler = _fill_when_the_upload_starts(machine, share)
        try:
            out = env.fails(*add)
        finally:
            filler.wait(timeout=60)
        assert f"no space left on the node's disk at {share}" in out, out
        assert "free some space there and retry" in out, out
        assert "m1" not in {n["name"] for n in env.json("node", "list")}
        assert machine.exec("ls", "-A", f"{share}/vendetta/agent").split() == []

        machine.exec("rm", f"{share}/filler")  # the cause fixed: a retry installs
        added = env.cli(*add, timeout=600)
        assert "added" in added.stdout and "ready" in added.stdout, added.stdout
        node = env.wait_node("m1", "ready")
        assert node["agent_version"] == env.node("n1")["agent_version"]
        # No engine in there: every provider is listed, not ready, with its reason.
        providers = {p["name"]: p for p in node["providers"]}
        assert set(providers) == {"docker", "lxd", "qemu"}, providers
        for p in providers.values():
            assert not p["ready"] and p["detail"], p
        state = "/home/vdnode/.local/state/vendetta-agent"
        data = "/home/vdnode/.local/share/vendetta"
        assert machine.exec("ls", f"{data}/agent").split() == [node["agent_version"]]
        # No systemd in there: a detached agent with its pid file.
        assert {"agent.sock", "agent.pid"} <= set(machine.exec("ls", state).split())

        removed = env.cli("node", "remove", "m1", "--purge")
        assert "its agent and its state deleted" in removed.stdout
        left = machine.exec(
            "sh", "-c",
            f"ls -d {data}/agent {state} 2>/dev/null; "
            "grep -l 'nodeagent[.]main' /proc/[0-9]*/cmdline 2>/dev/null; true",
        )  # fmt: skip
        assert left.split() == [], left
        assert "m1" not in {n["name"] for n in env.json("node", "list")}
    finally:
        machine.stop()
