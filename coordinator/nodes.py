"""Node registry: one supervised connection per node, its state and events.

A node whose connection drops is `disconnected` (never forgotten, never its
workspaces touched) and is reconnected with exponential backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from common.errors import NodeUnreachableError, NotFoundError, VendettaError
from common.events import EventBus
from coordinator.agent_client import AgentClient
from coordinator.models import NodeRecord, NodeState
from coordinator.transports import Transport
from vendetta.v1 import nodeagent_pb2

log = logging.getLogger("vendetta.nodes")

HEARTBEAT_INTERVAL = 5.0
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 30.0


@dataclass
class NodeEvent:
    node: NodeConnection
    message: str
    time_unix_nano: int


class NodeConnection:
    """The live side of one node: transport, agent client, state."""

    def __init__(
        self,
        record: NodeRecord,
        transport: Transport,
        on_change: Callable[[NodeConnection, str], None],
    ) -> None:
        self.record = record
        self.transport = transport
        self.state = NodeState.CONNECTING
        self.info: nodeagent_pb2.InfoResponse | None = None
        self.last_error = ""
        self.last_seen_unix_nano = 0
        self._client: AgentClient | None = None
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._on_change = on_change

    @property
    def name(self) -> str:
        return self.record.name

    def _set(self, state: NodeState, message: str) -> None:
        changed = state != self.state
        self.state = state
        if changed or message:
            self._on_change(self, message)

    async def open(self) -> None:
        """Connect once, raising what went wrong (used by `node add`)."""
        channel = await self.transport.connect()
        client = AgentClient(channel)
        try:
            self.info = await client.info()
        except BaseException:
            await self.transport.close()
            raise
        self._connected(client)

    def _connected(self, client: AgentClient) -> None:
        self._client = client
        self.last_error = ""
        self.last_seen_unix_nano = time.time_ns()
        self._ready.set()
        self._set(NodeState.READY, "connected")

    def supervise(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=f"node-{self.name}")

    async def _loop(self) -> None:
        backoff = BACKOFF_INITIAL
        while True:
            if self._client is None:
                try:
                    self._set(NodeState.CONNECTING, "")
                    await self.open()
                except VendettaError as exc:
                    self.last_error = str(exc)
                    log.warning("node %s: %s", self.name, exc)
                except Exception as exc:  # never let one node's bug kill supervision
                    self.last_error = f"unexpected: {exc!r}"
                    log.exception("node %s: connect failed", self.name)
            if self._client is not None:
                backoff = BACKOFF_INITIAL
                reason = await self._watch(self._client)
                self.last_error = reason
                self._client = None
                self._ready.clear()
                await self.transport.close()
            self._set(NodeState.DISCONNECTED, self.last_error)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _watch(self, client: AgentClient) -> str:
        """Heartbeat until the agent or the connection fails; return why."""
        closed = asyncio.create_task(self.transport.wait_closed())
        try:
            while True:
                done, _ = await asyncio.wait({closed}, timeout=HEARTBEAT_INTERVAL)
                if done:
                    return "connection lost"
                try:
                    await client.heartbeat()
                    self.last_seen_unix_nano = time.time_ns()
                except VendettaError as exc:
                    return f"agent not answering: {exc}"
        finally:
            closed.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await closed

    async def client(self, wait: float = 5.0) -> AgentClient:
        """The agent client, waiting briefly for a reconnect in progress."""
        if self._client is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), wait)
        if self._client is None:
            why = f": {self.last_error}" if self.last_error else ""
            raise NodeUnreachableError(
                f"node {self.name!r} is disconnected{why}. Its workspaces are untouched; "
                f"check it with `vendetta node status {self.name}` and retry when it is back"
            )
        return self._client

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._client = None
        self._ready.clear()
        await self.transport.close()


class NodeRegistry:
    def __init__(self, transport_factory: Callable[[NodeRecord], Transport]) -> None:
        self._nodes: dict[str, NodeConnection] = {}
        self._transport_factory = transport_factory
        self.events: EventBus[NodeEvent] = EventBus()
        self._on_ready: list[Callable[[NodeConnection], Coroutine[Any, Any, None]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def on_ready(self, callback: Callable[[NodeConnection], Coroutine[Any, Any, None]]) -> None:
        self._on_ready.append(callback)

    def _changed(self, node: NodeConnection, message: str) -> None:
        self.events.publish(NodeEvent(node, message, time.time_ns()))
        if node.state == NodeState.READY:
            for cb in self._on_ready:
                task = asyncio.create_task(cb(node))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def connection(self, record: NodeRecord) -> NodeConnection:
        return NodeConnection(record, self._transport_factory(record), self._changed)

    def add(self, conn: NodeConnection) -> None:
        self._nodes[conn.name] = conn
        conn.supervise()

    def get(self, name: str) -> NodeConnection:
        try:
            return self._nodes[name]
        except KeyError:
            known = ", ".join(sorted(self._nodes)) or "none"
            raise NotFoundError(
                f"unknown node {name!r} (known: {known}); add it with "
                f"`vendetta node add {name} ADDRESS`"
            ) from None

    def all(self) -> list[NodeConnection]:
        return [self._nodes[n] for n in sorted(self._nodes)]

    async def remove(self, name: str) -> None:
        conn = self._nodes.pop(name, None)
        if conn is not None:
            await conn.close()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*(c.close() for c in self._nodes.values()))
        self._nodes.clear()
