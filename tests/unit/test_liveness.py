"""Liveness: a node is `disconnected` after a grace period of silence, not after one
missed heartbeat; meanwhile its workspaces are `unknown` and nothing is touched;
back, it is `ready` again and its workspaces are reconciled.

Against the in-process cluster (``fast_reconnect``: heartbeats every 0.1 s, a grace
of ``GRACE``); ``FakeTransport.silent`` drops the node's traffic: the connection
stays open, heartbeats go unanswered.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc.aio
import pytest

from coordinator import nodes
from coordinator.models import NodeRecord, NodeState
from providers.base import EnvState
from tests.support.fakes import Cluster, wait_until
from tests.unit.conftest import GRACE
from vendetta.v1 import coordinator_pb2 as pb

# What read() returns at the end of a stream (grpc-stubs does not declare it).
EOF_: Any = grpc.aio.EOF  # type: ignore[attr-defined]


async def node(cluster: Cluster, name: str) -> pb.Node:
    return await cluster.stub.GetNode(pb.GetNodeRequest(name=name))


async def ws_state(cluster: Cluster, name: str) -> int:
    return (await cluster.stub.GetWorkspace(pb.GetWorkspaceRequest(name=name))).state


async def running_workspace(cluster: Cluster, name: str, node_name: str) -> None:
    await cluster.stub.CreateWorkspace(pb.CreateWorkspaceRequest(name=name, node=node_name))
    await cluster.stub.UpWorkspace(pb.WorkspaceRequest(name=name))


class NodeEvents:
    """Collects one node's events from a WatchNodes stream, in the background."""

    def __init__(self, cluster: Cluster, name: str) -> None:
        self.call = cluster.stub.WatchNodes(pb.WatchNodesRequest())
        self.name = name
        self.events: list[pb.NodeEvent] = []
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            ev = await self.call.read()
            if ev is EOF_:
                return
            assert isinstance(ev, pb.NodeEvent)
            if ev.node.name == self.name:
                self.events.append(ev)

    def states(self) -> list[int]:
        """The node's states, each change once."""
        out: list[int] = []
        for ev in self.events:
            if not out or out[-1] != ev.node.state:
                out.append(ev.node.state)
        return out

    def close(self) -> None:
        self.call.cancel()
        self.task.cancel()


async def test_missed_heartbeats_within_the_grace_keep_the_node_ready(
    fast_reconnect: None, cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nodes, "HEARTBEAT_TIMEOUT", 0.05)  # each silent heartbeat: missed
    await running_workspace(cluster, "ws1", "node1")
    watch = NodeEvents(cluster, "node1")
    try:
        await wait_until(lambda: bool(watch.events), "the current picture")
        conn = cluster.coordinator.nodes.get("node1")
        transport = cluster.transport("node1")
        closes = transport.closes
        transport.silent = True
        await wait_until(lambda: conn.last_error.startswith("heartbeat missed"), "a miss")
        await asyncio.sleep(GRACE / 2)  # several heartbeats missed, within the grace
        assert conn.last_error.startswith("heartbeat missed")
        # Still ready, its workspace as it was, its connection (streams, forwards) kept.
        assert (await node(cluster, "node1")).state == pb.NODE_STATE_READY
        assert await ws_state(cluster, "ws1") == pb.WORKSPACE_STATE_RUNNING
        transport.silent = False
        await wait_until(lambda: conn.last_error == "", "a heartbeat answered again")
        assert watch.states() == [pb.NODE_STATE_READY]
        assert transport.closes == closes
    finally:
        watch.close()


async def test_a_silent_node_is_disconnected_after_its_grace_then_back(
    fast_reconnect: None, cluster: Cluster
) -> None:
    fake = cluster.provider("node1")
    await running_workspace(cluster, "ws1", "node1")
    await running_workspace(cluster, "ws2", "local")
    watch = NodeEvents(cluster, "node1")
    try:
        await wait_until(lambda: bool(watch.events), "the current picture")
        transport = cluster.transport("node1")
        conn = cluster.coordinator.nodes.get("node1")
        silent_since = time.monotonic()
        transport.silent = True

        await wait_until(lambda: conn.state == NodeState.DISCONNECTED, "node1 disconnected", 10)
        # Not before the grace (less the one heartbeat that may have been its last answer).
        assert time.monotonic() - silent_since >= GRACE - nodes.HEARTBEAT_INTERVAL - 0.05
        away = await node(cluster, "node1")
        assert away.state == pb.NODE_STATE_DISCONNECTED
        assert "no answer for" in watch.events[-1].message
        assert await ws_state(cluster, "ws1") == pb.WORKSPACE_STATE_UNKNOWN
        # Other nodes are unaffected; nothing on the silent one was stopped or destroyed.
        assert (await node(cluster, "local")).state == pb.NODE_STATE_READY
        assert await ws_state(cluster, "ws2") == pb.WORKSPACE_STATE_RUNNING
        assert fake.state_of("ws1") == EnvState.RUNNING
        assert not [c for c in fake.calls if c[0] in ("stop", "destroy")]

        # While away the environment stopped; back, the reconciler restarts it.
        fake.set_state("ws1", EnvState.STOPPED)
        transport.silent = False
        await wait_until(lambda: conn.state == NodeState.READY, "node1 ready again")
        await wait_until(lambda: fake.state_of("ws1") == EnvState.RUNNING, "ws1 restarted")

        async def running_again() -> bool:
            return await ws_state(cluster, "ws1") == pb.WORKSPACE_STATE_RUNNING

        await wait_until(running_again, "ws1 running again")
        # The watch saw both transitions, without flapping in between.
        assert watch.states() == [
            pb.NODE_STATE_READY,
            pb.NODE_STATE_DISCONNECTED,
            pb.NODE_STATE_READY,
        ]
        assert watch.events[-1].message == "connected"
    finally:
        watch.close()


async def test_grace_per_node_and_default(fast_reconnect: None, cluster: Cluster) -> None:
    registry = cluster.coordinator.nodes
    own = registry.connection(NodeRecord(name="n2", address="x", transport="ssh", grace_seconds=42))
    default = registry.connection(NodeRecord(name="n3", address="x", transport="ssh"))
    assert (own.grace, default.grace) == (42, GRACE)
    assert (await node(cluster, "node1")).grace_seconds == GRACE
    await wait_until(lambda: registry.get("node1").latency_seconds > 0, "a heartbeat measured")
    assert (await node(cluster, "node1")).latency_seconds > 0


async def test_a_grace_shorter_than_the_heartbeat_interval_does_not_flap(
    fast_reconnect: None, cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `node add --grace 3` with heartbeats every 5 s: the node must not turn
    # `disconnected` between two heartbeats its agent answers.
    monkeypatch.setattr(nodes, "HEARTBEAT_INTERVAL", 3 * GRACE)
    registry = cluster.coordinator.nodes
    short = registry.connection(
        NodeRecord(name="n2", address="x", transport="ssh", grace_seconds=3)
    )
    assert short.heartbeat_interval == pytest.approx(1.0)
    assert registry.get("node1").heartbeat_interval == pytest.approx(GRACE / 3)
    watch = NodeEvents(cluster, "node1")
    try:
        await wait_until(lambda: bool(watch.events), "the current picture")
        await asyncio.sleep(2 * GRACE)
        assert (await node(cluster, "node1")).state == pb.NODE_STATE_READY
        assert watch.states() == [pb.NODE_STATE_READY], watch.events
    finally:
        watch.close()
