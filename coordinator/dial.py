"""Connections into and out of a workspace for `ssh NAME.vendetta`, relayed
between the client and the workspace's agent: Dial (`ssh -L`/`-D`: a
connection from inside, nodeagent/dial.py; DialRoute hands a client on this
machine the way to the agent's dial socket instead) and Listen (`ssh -R`/`-A`: a
listener inside, nodeagent/listen.py). Bytes pass through; the coordinator
keeps nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TypeVar

from common.errors import FailedPreconditionError, InvalidArgumentError
from coordinator.agent_client import AgentClient
from coordinator.models import WorkspaceRecord, WorkspaceState
from coordinator.nodes import NodeRegistry
from coordinator.workspaces import WorkspaceService
from vendetta.v1 import common_pb2
from vendetta.v1 import coordinator_pb2 as pb

In = TypeVar("In", common_pb2.DialInput, common_pb2.ListenInput)


async def _running(workspaces: WorkspaceService, name: str) -> WorkspaceRecord:
    ws = await workspaces.get(name)
    if ws.observed != WorkspaceState.RUNNING:
        raise FailedPreconditionError(
            f"workspace {ws.name!r} is {ws.observed.value}: start it with "
            f"`vendetta workspace up {ws.name}`"
        )
    return ws


async def _open(
    workspaces: WorkspaceService, nodes: NodeRegistry, requests: AsyncIterator[In], kind: str
) -> tuple[AgentClient, AsyncIterator[In]]:
    """The workspace's agent, and the requests with `start` naming its provider."""
    first = await anext(aiter(requests), None)
    if first is None or first.WhichOneof("input") != "start":
        raise InvalidArgumentError(f"a {kind} stream starts with a `start` message")
    ws = await _running(workspaces, first.start.workspace)
    client = await nodes.get(ws.node).client()
    first.start.provider = ws.provider

    async def forward() -> AsyncIterator[In]:
        yield first
        async for msg in requests:
            yield msg

    return client, forward()


async def relay(
    workspaces: WorkspaceService,
    nodes: NodeRegistry,
    requests: AsyncIterator[common_pb2.DialInput],
) -> AsyncIterator[common_pb2.DialOutput]:
    client, forward = await _open(workspaces, nodes, requests, "dial")
    async for out in client.dial(forward):
        yield out


async def relay_listen(
    workspaces: WorkspaceService,
    nodes: NodeRegistry,
    requests: AsyncIterator[common_pb2.ListenInput],
) -> AsyncIterator[common_pb2.ListenOutput]:
    client, forward = await _open(workspaces, nodes, requests, "listen")
    async for out in client.listen(forward):
        yield out


async def route(
    workspaces: WorkspaceService, nodes: NodeRegistry, start: common_pb2.DialStart
) -> pb.DialRouteReply:
    """Where a client on this machine connects for a Dial without gRPC: the node's
    forward to its agent's dial socket, which this process never reads."""
    ws = await _running(workspaces, start.workspace)
    node = nodes.get(ws.node)
    await node.client()  # connected (the forward comes and goes with the tunnel)
    path = node.transport.dial_socket()
    if path is None:
        raise FailedPreconditionError(
            f"node {ws.node!r} has no dial socket here (its tunnel is carried by asyncssh, "
            "or its agent predates it): use Dial"
        )
    routed = common_pb2.DialStart()
    routed.CopyFrom(start)
    routed.provider = ws.provider
    control = node.transport.control_socket()
    return pb.DialRouteReply(
        socket=str(path),
        start=routed,
        control=str(control) if control is not None else "",
        local=node.transport.kind == "local",
    )
