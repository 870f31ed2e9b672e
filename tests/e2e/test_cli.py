"""The CLI end to end: a real coordinator, real agents reached through real
sshd on loopback (each node its own host key, agent dir and socket), and the
real Docker engine.

Tests run in file order and share one coordinator (module scope): nodes added
early are used later, as a user would.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import TEST_IMAGE
from tests.support.cli import BIN, Env, agent_id, cli_env, containers
from tests.support.sshd import SshServer

pytestmark = [pytest.mark.e2e, pytest.mark.docker, pytest.mark.sshd]


def write_config(path: Path, name: str, image: str = TEST_IMAGE, extra: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"name: {name}\n"
        "provider: docker\n"
        f"docker:\n  image: {image}\n"
        # trapped: sh as first process ignores SIGTERM, a down would wait 10 s
        '  command: [/bin/sh, -c, \'trap "exit 0" TERM; i=0;'
        " while :; do i=$((i+1)); echo tick $i; sleep 0.2; done']\n" + extra
    )
    return path


@pytest.fixture(scope="module")
def e2e() -> Iterator[Env]:
    with cli_env() as e:
        e.nodes["node1"] = SshServer.start(e.home / "sshd1", host="127.0.0.2")
        e.nodes["node2"] = SshServer.start(e.home / "sshd2", host="127.0.0.3")
        # A short grace: the node tests below wait for `disconnected` (15 s by default).
        e.cli("server", "start", "--node-grace", "5")
        yield e


def test_server_runs_with_the_local_node(e2e: Env) -> None:
    status = e2e.cli("server", "status")
    assert "coordinator is running" in status.stdout
    local = e2e.wait_node("local", "ready")
    ready = {p["name"] for p in local["providers"] if p["ready"]}
    assert ready == {"docker", "lxd", "qemu"}, local["providers"]
    # starting twice is fine and says so
    assert "already running" in e2e.cli("server", "start").stdout


def test_node_add_pins_host_key_and_starts_agent(e2e: Env) -> None:
    server = e2e.nodes["node1"]
    added = e2e.add_node("node1", server)
    assert server.host_fingerprint() in added.stderr  # shown before pinning
    assert "added" in added.stdout and "ready" in added.stdout
    node = e2e.node("node1")
    assert node["state"] == "NODE_STATE_READY"
    assert node["host_key_fingerprint"] == server.host_fingerprint()
    assert node["agent_version"]
    assert any(p["name"] == "docker" and p["ready"] for p in node["providers"])
    status = e2e.cli("node", "status", "node1").stdout
    assert "docker" in status and "ready" in status
    # the agent listens on a 0600 unix socket in its own dir
    sock = e2e.home / "agent-node1" / "agent.sock"
    assert sock.stat().st_mode & 0o777 == 0o600
    node_test_measures_and_checks(e2e, "node1", server.host_fingerprint())


def node_test_measures_and_checks(e2e: Env, name: str, fingerprint: str) -> None:
    table = e2e.cli("node", "test", name).stdout  # exit 0: every check passed
    for label in ("ssh connect", "host key", "agent version", "round trip", "tunnel throughput"):
        assert label in table, table
    assert "docker usable" in table and "all checks passed" in table
    r = e2e.json("node", "test", name)
    assert r["ok"] is True
    rows = {(c["provider"], c["name"]): c for c in r["checks"]}
    assert all(c["ok"] for c in r["checks"] if not c["skipped"]), r["checks"]
    assert rows[("", "host key")]["value"] == f"{fingerprint} (pinned, matches)"
    assert rows[("", "agent version")]["value"] == r["node"]["agent_version"]
    assert r["heartbeats"] >= 20
    assert 0 < r["rtt_p50_seconds"] <= r["rtt_p99_seconds"]
    assert r["ssh_seconds"] > 0 and r["throughput_bytes_per_second"] > 0
    # The tunnel runs in an OpenSSH child (this machine has the client), not in Python.
    assert rows[("", "tunnel throughput")]["value"].endswith("carried by OpenSSH (ssh -L)")
    for check in ("installed", "reachable", "permitted", "usable", "images"):
        assert rows[("docker", check)]["ok"], rows[("docker", check)]
    assert (
        TEST_IMAGE in rows[("docker", "images")]["value"]
        or "more" in (rows[("docker", "images")]["value"])
    )


def test_remote_workspace_lifecycle_with_logs_follow(e2e: Env) -> None:
    cfg = write_config(e2e.home / "proj1" / ".vendetta" / "config.yaml", "proj1")
    created = e2e.cli("workspace", "create", "ws1", "--remote", "node1", "--config", str(cfg))
    assert "created on node node1" in created.stdout
    ws = e2e.workspace("ws1")
    assert ws["state"] == "WORKSPACE_STATE_STOPPED" and ws["node"] == "node1"

    up = e2e.cli("workspace", "up", "ws1")
    assert "running" in up.stdout and "node1" in up.stdout
    assert e2e.cli("workspace", "up", "ws1").returncode == 0  # idempotent
    (container,) = containers("ws1")
    assert container.status == "running"

    listed = {w["name"]: w for w in e2e.json("workspace", "list")}
    assert listed["ws1"]["state"] == "WORKSPACE_STATE_RUNNING"

    # logs -f streams new lines until the workspace stops
    follow = subprocess.Popen(
        [str(BIN / "vendetta"), "workspace", "logs", "ws1", "-f", "--tail", "1"],
        env=e2e.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert follow.stdout is not None
        seen = [follow.stdout.readline() for _ in range(3)]
        assert all(line.startswith("tick ") for line in seen), seen
        numbers = [int(line.split()[1]) for line in seen]
        assert numbers == sorted(numbers) and len(set(numbers)) == 3
        down = e2e.cli("workspace", "down", "ws1")
        assert "stopped" in down.stdout
        assert follow.wait(timeout=30) == 0
    finally:
        follow.kill()
    assert e2e.cli("workspace", "down", "ws1").returncode == 0  # idempotent

    tail = e2e.cli("workspace", "logs", "ws1", "--tail", "2").stdout.splitlines()
    assert len(tail) == 2 and all(t.startswith("tick ") for t in tail)

    e2e.cli("workspace", "destroy", "ws1")
    assert containers("ws1") == []
    assert "unknown workspace" in e2e.fails("workspace", "status", "ws1")


def test_local_workspace_exec(e2e: Env) -> None:
    cfg = write_config(e2e.home / "proj2" / ".vendetta" / "config.yaml", "proj2")
    e2e.cli("workspace", "create", "loc", "--config", str(cfg))
    assert e2e.workspace("loc")["node"] == "local"
    e2e.cli("workspace", "up", "loc")
    run = e2e.cli("workspace", "exec", "loc", "--", "sh", "-c", "echo out-$((6*7)); echo err >&2")
    assert run.stdout == "out-42\n" and run.stderr == "err\n"
    code = e2e.cli("workspace", "exec", "loc", "--", "sh", "-c", "exit 7", check=False)
    assert code.returncode == 7
    e2e.cli("workspace", "destroy", "loc")
    assert containers("loc") == []


def test_two_remote_nodes_have_separate_agents(e2e: Env) -> None:
    e2e.add_node("node2", e2e.nodes["node2"])
    cfg = write_config(e2e.home / "proj3" / ".vendetta" / "config.yaml", "proj3")
    e2e.cli("workspace", "create", "ws2", "--remote", "node2", "--config", str(cfg))
    e2e.cli("workspace", "up", "ws2")
    (container,) = containers("ws2")
    assert container.labels["vendetta.agent"] == agent_id(e2e.home / "agent-node2")
    assert agent_id(e2e.home / "agent-node1") != agent_id(e2e.home / "agent-node2")
    nodes = {n["name"]: n for n in e2e.json("node", "list")}
    assert nodes["node2"]["workspaces"] == 1 and nodes["node1"]["workspaces"] == 0


def test_bad_names_and_unknowns(e2e: Env) -> None:
    assert "invalid workspace name" in e2e.fails("workspace", "create", "Bad_Name")
    assert "unknown workspace 'nope'" in e2e.fails("workspace", "up", "nope")
    assert "unknown node 'nowhere'" in e2e.fails(
        "workspace", "create", "ws9", "--remote", "nowhere"
    )
    assert "already exists" in e2e.fails("workspace", "create", "ws2", "--remote", "node2")
    assert "invalid node name" in e2e.fails(
        "node", "add", "Node_1", "127.0.0.2", "--port", str(e2e.nodes["node1"].port), "--yes"
    )
    out = e2e.fails(
        "node", "add", "node1", "127.0.0.2", "--port", str(e2e.nodes["node1"].port), "--yes"
    )
    assert "already exists" in out
    bad = e2e.home / "bad" / "config.yaml"
    bad.parent.mkdir()
    bad.write_text("name: x\nprovider: docker\ndocker: {imagee: foo}\n")
    out = e2e.fails("workspace", "create", "ws9", "--config", str(bad))
    assert str(bad) in out and "docker.imagee" in out and "unknown key" in out
    assert "ws9" not in {w["name"] for w in e2e.json("workspace", "list")}


def test_unreachable_node_and_wrong_key_are_refused(e2e: Env) -> None:
    server = e2e.nodes["node1"]
    # nothing listens there
    out = e2e.fails("node", "add", "ghost", "127.0.0.9", "--port", "1", "--yes")
    assert "cannot reach 127.0.0.9:1" in out
    # a key the node does not accept
    stranger = e2e.home / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    out = e2e.fails(
        "node",
        "add",
        "stranger",
        server.host,
        "--port",
        str(server.port),
        "--user",
        "root",
        "--identity",
        str(stranger),
        "--yes",
        "--agent-command",
        e2e.agent_command("stranger"),
    )
    assert "refused SSH authentication" in out and str(stranger) in out
    names = {n["name"] for n in e2e.json("node", "list")}
    assert "ghost" not in names and "stranger" not in names


def test_docker_down_and_missing_image(e2e: Env) -> None:
    server = e2e.nodes["node1"]
    e2e.cli(
        "node",
        "add",
        "nodocker",
        server.host,
        "--port",
        str(server.port),
        "--user",
        "root",
        "--identity",
        str(server.client_key_path),
        "--yes",
        "--agent-command",
        e2e.agent_command("nodocker", "--docker-host unix:///nonexistent.sock"),
    )
    status = e2e.cli("node", "status", "nodocker").stdout
    assert "not ready" in status and "Docker daemon not reachable" in status
    # `node test` shows the failing row with what to do, and fails
    out = e2e.fails("node", "test", "nodocker")
    assert "docker reachable" in out and "FAIL" in out
    assert "docker reachable: Docker daemon not reachable at unix:///nonexistent.sock" in out
    failed = e2e.cli("node", "test", "nodocker", "--json", check=False)
    assert failed.returncode == 1
    r = json.loads(failed.stdout)
    rows = {(c["provider"], c["name"]): c for c in r["checks"]}
    assert r["ok"] is False and rows[("docker", "installed")]["ok"]
    assert not rows[("docker", "reachable")]["ok"] and not rows[("docker", "reachable")]["skipped"]
    assert "start it" in rows[("docker", "reachable")]["fix"]
    assert rows[("docker", "images")]["skipped"]
    assert rows[("", "round trip")]["ok"]
    cfg = write_config(e2e.home / "proj4" / ".vendetta" / "config.yaml", "proj4")
    out = e2e.fails("workspace", "create", "wsd", "--remote", "nodocker", "--config", str(cfg))
    assert "Docker daemon not reachable" in out
    assert "wsd" not in {w["name"] for w in e2e.json("workspace", "list")}

    missing = write_config(
        e2e.home / "proj5" / ".vendetta" / "config.yaml", "proj5", image="vendetta/missing:0"
    )
    out = e2e.fails("workspace", "create", "wsm", "--remote", "node1", "--config", str(missing))
    assert "vendetta/missing:0" in out and "not on this node" in out
    assert "wsm" not in {w["name"] for w in e2e.json("workspace", "list")}
    assert containers("wsm") == []
    e2e.cli("node", "remove", "nodocker")


def test_node_down_then_back(e2e: Env) -> None:
    server = e2e.nodes["node1"]
    cfg = write_config(e2e.home / "proj6" / ".vendetta" / "config.yaml", "proj6")
    e2e.cli("workspace", "create", "ws6", "--remote", "node1", "--config", str(cfg))
    e2e.cli("workspace", "up", "ws6")
    server.stop()
    e2e.wait_node("node1", "disconnected")
    assert e2e.workspace("ws6")["state"] == "WORKSPACE_STATE_UNKNOWN"
    out = e2e.fails("workspace", "down", "ws6")
    assert "node 'node1' is disconnected" in out
    # the same host key comes back on the same address: the node reconnects by itself
    server.restart()
    e2e.wait_node("node1", "ready")
    assert e2e.workspace("ws6")["state"] == "WORKSPACE_STATE_RUNNING"
    e2e.cli("workspace", "destroy", "ws6")


def test_changed_host_key_is_refused(e2e: Env) -> None:
    server = e2e.nodes["node2"]
    old = server.host_fingerprint()
    server.rotate_host_key(drop_connections=True)
    new = server.host_fingerprint()
    node = e2e.wait_node("node2", "disconnected")
    deadline = time.monotonic() + 60
    while "has changed" not in node["last_error"] and time.monotonic() < deadline:
        time.sleep(0.3)
        node = e2e.node("node2")
    assert "has changed" in node["last_error"]
    assert old in node["last_error"] and new in node["last_error"]
    assert "vendetta node trust node2" in node["last_error"]
    out = e2e.fails("workspace", "up", "ws2")
    assert "disconnected" in out and "has changed" in out
    # the pinned key was not replaced
    assert e2e.node("node2")["host_key_fingerprint"] == old
    # trusting needs a deliberate yes: without a terminal to ask, --yes
    out = e2e.fails("node", "trust", "node2")
    assert "--yes" in out and old in out and new in out
    assert e2e.node("node2")["host_key_fingerprint"] == old
    trusted = e2e.cli("node", "trust", "node2", "--yes")
    assert new in trusted.stdout
    assert e2e.wait_node("node2", "ready")["host_key_fingerprint"] == new
    # the node's workspace is still there and works again
    e2e.cli("workspace", "up", "ws2")
    assert e2e.workspace("ws2")["state"] == "WORKSPACE_STATE_RUNNING"
    assert "not reached over SSH" in e2e.fails("node", "trust", "local")
    # trusting an unchanged key changes nothing
    assert "unchanged" in e2e.cli("node", "trust", "node2").stderr
