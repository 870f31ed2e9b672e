"""Nodes whose SSH user is not root: `node add` installs the agent, which runs as that user.

Each user's sshd sessions get a fresh home with nothing of vendetta in it or on
the PATH. A user in the docker, lxd, libvirt and kvm groups gets a workspace on
each provider up, runs a command in it and destroys it, leaving nothing behind
(no container, instance or domain; nothing in the QEMU state folder, which is
the user's own); `node test` passes every row; a QEMU image it imports goes to
its own image folder and boots. A user in none of the groups gets a node whose
providers are not ready, each saying which file refused it and the command
that fixes it, and `node test` fails their `permitted` rows with that fix.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import LXD_TEST_IMAGE, TEST_IMAGE, require
from tests.support.cli import Env, cli_env
from tests.support.node_user import (
    MEMBER,
    OUTSIDER,
    open_dir,
    owner_of,
    remove_as_root,
    users_problem,
)
from tests.support.sshd import SshServer

# `node add` builds the bundle (once per coordinator) and installs it, libvirt-python
# compiled from its sdist on the node.
INSTALL_TIMEOUT = 600
# The test guest image (root's, readable by all) and its files (providers.qemu.images).
SYSTEM_IMAGE = Path("/var/cache/vendetta/images/debian-12")
GUEST_FILES = ("vmlinuz", "initrd.img", "rootfs.qcow2")

pytestmark = [pytest.mark.e2e, pytest.mark.sshd]

SECTIONS = {
    "docker": f"docker: {{image: '{TEST_IMAGE}'}}",
    "lxd": f"lxd: {{image: '{LXD_TEST_IMAGE}', cpu: 1, memory: 256M}}",
    "qemu": "qemu: {image: debian-12, cpu: 1, memory: 512M, disk: 2G}",
}


def _user_home(user: str, scratch: Path) -> Path:
    """A fresh home of ``user``'s (its sshd sessions get it as HOME): nothing of vendetta
    in it or on the sessions' PATH, and whatever the agent leaves goes with ``scratch``."""
    path = scratch / f"home-{user}"
    path.mkdir(mode=0o755)
    shutil.chown(path, user, user)
    return path


def _add_user_node(e: Env, name: str, user: str, host: str, scratch: Path) -> None:
    """Add a node reached over its own sshd as ``user``, which `node add` installs the
    agent for."""
    user_home = _user_home(user, scratch)
    # sshd reads authorized_keys as the user: in a folder it may enter (open_dir).
    server = SshServer.start(
        open_dir(f"vd-sshd-{user}-"), host=host, session_env={"HOME": str(user_home)}
    )
    server.user = user
    server.authorized_keys_path.chmod(0o644)
    e.nodes[name] = server
    e.agent_dirs.append(user_home / ".local" / "state" / "vendetta-agent")
    e.cli(
        "node", "add", name, server.host, "--port", str(server.port), "--user", user,
        "--identity", str(server.client_key_path), "--yes", timeout=INSTALL_TIMEOUT,
    )  # fmt: skip


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    problem = users_problem()
    require("the test users", not problem, problem)
    scratch = open_dir("vd-nonroot-")
    made: list[Path] = []
    try:
        with cli_env(prefix="vd-nonroot-") as e:
            e.cli("server", "start")
            nodes = [("member", MEMBER, "127.0.0.11"), ("outsider", OUTSIDER, "127.0.0.12")]
            # Both at once: one bundle build, the two installs' compiles side by side.
            try:
                with ThreadPoolExecutor(len(nodes)) as pool:
                    for add in [pool.submit(_add_user_node, e, *n, scratch) for n in nodes]:
                        add.result()
            finally:
                made += [server.root for server in e.nodes.values()]
            yield e
    finally:
        remove_as_root(scratch, *made)


def _providers(e: Env, node: str) -> dict[str, dict[str, object]]:
    return {p["name"]: p for p in e.node(node)["providers"]}


def _home(e: Env, user: str) -> Path:
    (agent_dir,) = (d for d in e.agent_dirs if f"home-{user}" in d.parts)
    return agent_dir.parents[2]


def test_node_add_installs_the_agent_and_it_runs_as_the_node_user(env: Env) -> None:
    user_home = _home(env, MEMBER)
    build = str(env.node("member")["agent_version"])
    installed = user_home / ".local" / "share" / "vendetta" / "agent" / build
    pid = int((user_home / ".local" / "state" / "vendetta-agent" / "agent.pid").read_text())
    assert owner_of(pid) == MEMBER
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert argv[0].decode() == str(installed / "bin" / "python"), argv
    assert installed.owner() == MEMBER
    ready = {name: p["ready"] for name, p in _providers(env, "member").items()}
    assert ready == {"docker": True, "lxd": True, "qemu": True}, _providers(env, "member")
    # The tunnel to that user's agent runs in OpenSSH's client, logged in as the user.
    checks = {c["name"]: c for c in env.json("node", "test", "member")["checks"]}
    assert checks["tunnel throughput"]["value"].endswith("carried by OpenSSH (ssh -L)"), checks


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
    name = f"nr-{provider}-{uuid.uuid4().hex[:6]}"  # apart from any other run on this host
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
        state = _home(env, MEMBER) / ".local" / "share" / "vendetta" / "qemu"
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


def _node_test(e: Env, node: str) -> tuple[int, str, dict[tuple[str, str], dict[str, object]]]:
    """`node test` as a table and as JSON: (exit code, table, rows by (provider, check))."""
    table = e.cli("node", "test", node, check=False)
    as_json = e.cli("node", "test", node, "--json", check=False)
    assert as_json.returncode == table.returncode, (table, as_json)
    checks = json.loads(as_json.stdout)["checks"]
    return table.returncode, table.stdout, {(c["provider"], c["name"]): c for c in checks}


def test_node_test_passes_every_row_for_a_member_of_the_groups(env: Env) -> None:
    code, table, rows = _node_test(env, "member")
    assert code == 0 and "all checks passed" in table, table
    for provider in ("docker", "lxd", "qemu"):
        for check in ("installed", "reachable", "permitted", "usable", "images"):
            row = rows[(provider, check)]
            assert row["ok"] and not row["skipped"], row


def test_node_test_fails_permitted_for_a_user_outside_the_groups(env: Env) -> None:
    code, table, rows = _node_test(env, "outsider")
    assert code == 1, table
    flat = " ".join(table.split())
    for provider, group in (("docker", "docker"), ("lxd", "lxd"), ("qemu", "libvirt")):
        assert rows[(provider, "installed")]["ok"], rows[(provider, "installed")]
        assert rows[(provider, "reachable")]["ok"], rows[(provider, "reachable")]
        permitted = rows[(provider, "permitted")]
        fix = f"sudo usermod -aG {group} {OUTSIDER}"
        assert not permitted["ok"] and fix in str(permitted["fix"]), permitted
        assert f"{provider} permitted: " in flat and fix in flat, table
        assert rows[(provider, "usable")]["skipped"], rows[(provider, "usable")]


@pytest.mark.qemu
def test_a_qemu_image_imported_as_the_node_user_lands_in_its_own_folder_and_boots(
    env: Env,
) -> None:
    # Root's image folder is not the user's to write: the import goes to its own.
    name = f"nr-own-{uuid.uuid4().hex[:6]}"
    own = _home(env, MEMBER) / ".local" / "share" / "vendetta" / "images"
    done = env.cli(
        "image", "import", "member", str(SYSTEM_IMAGE), "--provider", "qemu", "--name", name,
        timeout=300,
    )  # fmt: skip
    assert f"Imported on member (qemu): {name}" in done.stderr, done.stderr
    assert sorted(p.name for p in (own / name).iterdir()) == sorted(GUEST_FILES)
    assert (own / name).owner() == MEMBER
    assert not (SYSTEM_IMAGE.parent / name).exists()
    listed = {i["name"] for i in env.json("image", "list", "member", "--provider", "qemu")}
    assert {name, SYSTEM_IMAGE.name} <= listed, listed
    # QEMU, as its own user, boots a guest on it
    ws = "nr-own-image"
    config = env.home / ws / ".vendetta" / "config.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    qemu = f"qemu: {{image: {name}, cpu: 1, memory: 512M, disk: 2G}}"
    config.write_text(f"name: {ws}\nprovider: qemu\n{qemu}\n")
    env.cli("workspace", "create", ws, "--remote", "member", "--config", str(config))
    env.cli("workspace", "up", ws)
    run = env.cli("workspace", "exec", ws, "--", "sh", "-c", "echo own-$((40+2))")
    assert run.stdout.split() == ["own-42"], run.stdout
    env.cli("workspace", "destroy", ws)
    assert _leftovers("qemu", ws) == []
