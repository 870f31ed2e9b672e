"""Connections into and out of a workspace for `ssh NAME.vendetta`, relayed
between the client and the workspace's agent: Dial (`ssh -L`/`-D`: a
connection from inside, nodeagent/dial.py) and Listen (`ssh -R`/`-A`: a
listener inside, nodeagent/listen.py). Bytes pass through; the coordinator
keeps nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TypeVar

from common.errors import FailedPreconditionError, InvalidArgumentError
from coordinator.agent_client import AgentClient
from coordinator.models import WorkspaceState
from coordinator.nodes import NodeRegistry
from coordinator.workspaces import WorkspaceService
from vendetta.v1 import common_pb2

In = TypeVar("In", common_pb2.DialInput, common_pb2.ListenInput)


async def _open(
    workspaces: WorkspaceService, nodes: NodeRegistry, requests: AsyncIterator[In], kind: str
) -> tuple[AgentClient, AsyncIterator[In]]:
    """The workspace's agent, and the requests with `start` naming its provider."""
    first = await anext(aiter(requests), None)
    if first is None or first.WhichOneof("input") != "start":
        raise InvalidArgumentError(f"a {kind} stream starts with a `start` message")
    ws = await workspaces.get(first.start.workspace)
    if ws.observed != WorkspaceState.RUNNING:
        raise FailedPreconditionError(
            f"workspace {ws.name!r} is {ws.observed.value}: start it with "
            f"`vendetta workspace up {ws.name}`"
        )
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
