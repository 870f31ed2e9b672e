"""The CLI's node commands against the in-process cluster: `node remove` (refused with
the workspaces named, --force), `cluster status` (table and --json), and
`node list --watch` streaming a node's transitions."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from tests.support.fakes import Cluster, wait_until
from vendetta.v1 import coordinator_pb2 as pb

VENDETTA = Path(sys.executable).with_name("vendetta")


async def cli(cluster: Cluster, *args: str) -> tuple[int, str, str]:
    """The real CLI in a subprocess (the coordinator serves from this event loop)."""
    proc = await asyncio.create_subprocess_exec(
        str(VENDETTA),
        *args,
        env={**os.environ, "VENDETTA_HOME": str(cluster.home), "COLUMNS": "200"},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def workspace(cluster: Cluster, name: str, node: str, up: bool = False) -> None:
    await cluster.stub.CreateWorkspace(pb.CreateWorkspaceRequest(name=name, node=node))
    if up:
        await cluster.stub.UpWorkspace(pb.WorkspaceRequest(name=name))


async def test_node_remove_names_the_workspaces_then_force(cluster: Cluster) -> None:
    await workspace(cluster, "ws-a", "node1")
    await workspace(cluster, "ws-b", "node1")
    code, _, err = await cli(cluster, "node", "remove", "node1")
    assert code == 1
    assert "ws-a, ws-b" in err and "--force" in err
    assert cluster.transport("node1").agent_stops == 0

    code, out, _ = await cli(cluster, "node", "remove", "node1", "--force")
    assert code == 0 and "node node1 removed" in out
    assert cluster.transport("node1").agent_stops == 1
    nodes = await cluster.stub.ListNodes(pb.ListNodesRequest())
    assert [n.name for n in nodes.nodes] == ["local"]


async def test_node_remove_purge_keeps_a_node_it_cannot_reach(cluster: Cluster) -> None:
    cluster.transport("node1").unreachable = True
    code, _, err = await cli(cluster, "node", "remove", "node1", "--purge")
    assert code != 0
    assert "fake network is down" in err and "Node 'node1' is kept" in err, err
    nodes = await cluster.stub.ListNodes(pb.ListNodesRequest())
    assert [n.name for n in nodes.nodes] == ["local", "node1"]

    cluster.transport("node1").unreachable = False
    code, out, _ = await cli(cluster, "node", "remove", "node1", "--purge")
    assert code == 0 and "its agent and its state deleted" in out, out
    assert cluster.transport("node1").purges == 1
    nodes = await cluster.stub.ListNodes(pb.ListNodesRequest())
    assert [n.name for n in nodes.nodes] == ["local"]


async def test_node_upgrade_of_agents_already_current(cluster: Cluster) -> None:
    code, out, _ = await cli(cluster, "node", "upgrade", "--all")
    assert code == 0, out
    for name in ("local", "node1"):
        assert f"node {name}: agent " in out and "already the coordinator's build" in out, out
    code, _, err = await cli(cluster, "node", "upgrade")
    assert code != 0 and "name one node, or --all" in err, err


async def test_cluster_status(cluster: Cluster) -> None:
    await workspace(cluster, "ws-a", "node1", up=True)
    await workspace(cluster, "ws-b", "node1")
    await workspace(cluster, "ws-c", "local", up=True)

    code, out, _ = await cli(cluster, "cluster", "status", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["coordinator"]["socket_path"] == str(cluster.coordinator.socket)
    by_name = {n["name"]: n for n in data["nodes"]}
    assert sorted(by_name) == ["local", "node1"]
    assert by_name["node1"]["state"] == "ready"
    assert by_name["node1"]["workspaces"] == {"running": 1, "stopped": 1}
    assert by_name["local"]["workspaces"] == {"running": 1}
    assert by_name["node1"]["providers"] == {"docker": True}
    assert by_name["node1"]["agent_version"]
    assert data["workspaces"] == {"running": 2, "stopped": 1}

    code, out, _ = await cli(cluster, "cluster", "status")
    assert code == 0
    assert "coordinator" in out and "LATENCY" in out
    assert "running 1, stopped 1" in out
    assert "workspaces: 3 (running 2, stopped 1)" in out


async def test_node_list_watch_shows_disconnect_and_return(
    fast_reconnect: None, cluster: Cluster
) -> None:
    proc = await asyncio.create_subprocess_exec(
        str(VENDETTA),
        "node",
        "list",
        "--watch",
        "--json",
        env={**os.environ, "VENDETTA_HOME": str(cluster.home)},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    seen: list[tuple[str, str]] = []

    async def line() -> None:
        assert proc.stdout is not None
        raw = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert raw, "the watch ended"
        ev = json.loads(raw)
        seen.append((ev["node"]["name"], ev["node"]["state"]))

    try:
        for _ in range(2):  # the current picture
            await line()
        assert seen == [("local", "NODE_STATE_READY"), ("node1", "NODE_STATE_READY")]
        transport = cluster.transport("node1")
        transport.silent = True
        while ("node1", "NODE_STATE_DISCONNECTED") not in seen:
            await line()
        transport.silent = False
        while seen[-1] != ("node1", "NODE_STATE_READY"):
            await line()
        states = [s for n, s in seen if n == "node1"]
        changes = [s for i, s in enumerate(states) if i == 0 or states[i - 1] != s]
        assert changes == ["NODE_STATE_READY", "NODE_STATE_DISCONNECTED", "NODE_STATE_READY"]
        assert ("local", "NODE_STATE_DISCONNECTED") not in seen
    finally:
        proc.terminate()
        await proc.wait()
    await wait_until(lambda: proc.returncode is not None, "the watch to end")
