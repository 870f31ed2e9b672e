"""`node add` installs the agent over SSH: a node user with nothing of vendetta.

The node is this machine behind a real sshd whose sessions get a fresh HOME
(sshd's SetEnv), so the agent lands in that HOME's ~/.local/share and nothing
of this checkout is on the session's PATH. The bundle is built with pip on the
coordinator's side; the node installs it with no package index.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_cli import write_config
from tests.support.cli import Env, cli_env, containers
from tests.support.sshd import SshServer

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
    env.nodes["n1"].kill_connections()
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
