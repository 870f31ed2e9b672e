"""Nodes whose SSH user is not root: the agent runs as that user.

A user in the docker, lxd, libvirt and kvm groups gets a workspace on each
provider up, runs a command in it and destroys it, leaving nothing behind (no
container, instance or domain; nothing in the QEMU state folder, which is the
user's own). A user in none of the groups gets a node whose providers are
not ready, each saying which file refused it and the command that fixes it.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import LXD_TEST_IMAGE, TEST_IMAGE, require
from tests.support.cli import Env, cli_env
from tests.support.node_user import (
    MEMBER,
    OUTSIDER,
    agent_python,
    home,
    open_dir,
    owner_of,
    remove_as_root,
    users_problem,
)
from tests.support.sshd import SshServer

pytestmark = [pytest.mark.e2e, pytest.mark.sshd]

SECTIONS = {
    "docker": f"docker: {{image: '{TEST_IMAGE}'}}",
    "lxd": f"lxd: {{image: '{LXD_TEST_IMAGE}', cpu: 1, memory: 256M}}",
    "qemu": "qemu: {image: debian-12, cpu: 1, memory: 512M, disk: 2G}",
}


def _add_user_node(e: Env, name: str, user: str, host: str, scratch: Path) -> list[Path]:
    """Add a node reached over its own sshd as ``user``; the folders to remove after."""
    # sshd reads authorized_keys as the user: in a folder it may enter (open_dir).
    server = SshServer.start(open_dir(f"vd-sshd-{user}-"), host=host)
    server.user = user
    server.authorized_keys_path.chmod(0o644)
    e.nodes[name] = server
    agent_dir = home(user) / ".local" / "state" / f"vendetta-agent-e2e-{uuid.uuid4().hex[:8]}"
    e.agent_dirs.append(agent_dir)
    python = agent_python(user, scratch)
    e.cli(
        "node",
        "add",
        name,
        server.host,
        "--port",
        str(server.port),
        "--user",
        user,
        "--identity",
        str(server.client_key_path),
        "--yes",
        "--agent-command",
        f"{python} -m nodeagent.main --dir {agent_dir}",
    )
    return [server.root, agent_dir]


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    problem = users_problem()
    require("the test users", not problem, problem)
    scratch = open_dir("vd-nonroot-")
    made: list[Path] = []
    try:
        with cli_env(prefix="vd-nonroot-") as e:
            e.cli("server", "start")
            made += _add_user_node(e, "member", MEMBER, "127.0.0.11", scratch)
            made += _add_user_node(e, "outsider", OUTSIDER, "127.0.0.12", scratch)
            yield e
    finally:
        remove_as_root(scratch, *made)


def _providers(e: Env, node: str) -> dict[str, dict[str, object]]:
    return {p["name"]: p for p in e.node(node)["providers"]}


def test_the_agent_runs_as_the_node_user(env: Env) -> None:
    agent_dir = next(d for d in env.agent_dirs if d.is_relative_to(home(MEMBER)))
    pid = int((agent_dir / "agent.pid").read_text())
    assert owner_of(pid) == MEMBER
    ready = {name: p["ready"] for name, p in _providers(env, "member").items()}
    assert ready == {"docker": True, "lxd": True, "qemu": True}, _providers(env, "member")


def _leftovers(provider: str, workspace: str) -> list[str]:
    if provider == "docker":
        argv = ["docker", "ps", "-a", "--filter", f"label=vendetta.workspace={workspace}", "-q"]
    elif provider == "lxd":
        argv = ["lxc", "list", "--format", "csv", "-c", "n"]
    else:
        argv = ["virsh", "-c", "qemu:///system", "list", "--all", "--name"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    if provider == "docker":
        return out.split()
    return [line for line in out.split() if workspace in line]


@pytest.mark.parametrize(
    "provider",
    [
        pytest.param("docker", marks=pytest.mark.docker),
        pytest.param("lxd", marks=pytest.mark.lxd),
        pytest.param("qemu", marks=pytest.mark.qemu),
    ],
)
def test_a_workspace_goes_up_runs_and_leaves_nothing(env: Env, provider: str) -> None:
    name = f"nr-{provider}"
    config = env.home / name / ".vendetta" / "config.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(f"name: {name}\nprovider: {provider}\n{SECTIONS[provider]}\n")
    env.cli("workspace", "create", name, "--remote", "member", "--config", str(config))
    env.cli("workspace", "up", name)
    run = env.cli("workspace", "exec", name, "--", "sh", "-c", "echo in-$((40+2))")
    assert run.stdout.split() == ["in-42"]
    env.cli("workspace", "destroy", name)
    assert _leftovers(provider, name) == []
    if provider == "qemu":  # the guest's disk, console and sockets were the user's, and are gone
        state = home(MEMBER) / ".local" / "share" / "vendetta" / "qemu"
        assert state.is_dir()
        assert [p.name for p in state.iterdir() if name in p.name] == []


def test_a_user_outside_the_groups_is_told_what_is_missing(env: Env) -> None:
    providers = _providers(env, "outsider")
    assert not any(p["ready"] for p in providers.values()), providers
    expected = {
        "docker": ("/var/run/docker.sock", f"sudo usermod -aG docker {OUTSIDER}"),
        "lxd": ("/var/lib/lxd/unix.socket", f"sudo usermod -aG lxd {OUTSIDER}"),
        "qemu": ("libvirt-sock", f"sudo usermod -aG libvirt {OUTSIDER}"),
    }
    for name, (path, fix) in expected.items():
        detail = str(providers[name]["detail"])
        assert "permission denied on" in detail and path in detail and fix in detail, detail
    status = env.cli("node", "status", "outsider").stdout
    assert f"usermod -aG docker {OUTSIDER}" in status, status
