"""Node registry: one supervised connection per node, its state and events.

Liveness is decided by silence, not by one failure: a node stays `ready` while
its agent answered within the node's grace period (`DEFAULT_GRACE`, the
coordinator's `--node-grace`, or the node's own), even if a heartbeat is
missed or the connection drops and is reopened meanwhile. Past the grace it
is `disconnected` (never forgotten, its workspaces never touched; users see
them `unknown`), the connection is torn down and reopened with exponential
backoff, and the next connect makes it `ready` again.

Tearing the connection down closes its gRPC channel, which ends every call still
in flight on it (streams too) with a NodeLostError naming the node: the
heartbeat is the keepalive of every call, so none outlives its node's grace.
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
from common.names import validate_name
from coordinator.agent_client import AgentClient
from coordinator.models import NodeRecord, NodeState
from coordinator.transports import Transport
from vendetta.v1 import nodeagent_pb2

log = logging.getLogger("vendetta.nodes")

HEARTBEAT_INTERVAL = 5.0
# A heartbeat not answered by then counts as missed (the next one is not held back long).
HEARTBEAT_TIMEOUT = 5.0
# A node's heartbeats come at least this many times within its grace period.
HEARTBEATS_PER_GRACE = 3
# Seconds of silence after which a node is `disconnected`, unless set for the
# coordinator (`vendetta server start --node-grace`) or for the node (`node add --grace`).
DEFAULT_GRACE = 15.0
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
        on_change: Callable[[NodeConnection, str, bool], None],
        default_grace: float | None = None,
    ) -> None:
        self.record = record
        self.transport = transport
        self.state = NodeState.CONNECTING
        self.info: nodeagent_pb2.InfoResponse | None = None
        self.last_error = ""
        self.last_seen_unix_nano = 0
        self.latency_seconds = 0.0  # the last heartbeat's round trip
        self._default_grace = default_grace
        self._client: AgentClient | None = None
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._on_change = on_change
        self._last_contact = 0.0  # time.monotonic() of the agent's last answer
        self._contact = asyncio.Event()
        self._attempted = asyncio.Event()  # supervision tried to connect (reconnect waits)
        self._silent = asyncio.Event()  # the grace ran out: the connection goes now

    @property
    def grace(self) -> float:
        """Seconds of silence before the node is `disconnected`: its own, else the default."""
        if self.record.grace_seconds > 0:
            return self.record.grace_seconds
        return DEFAULT_GRACE if self._default_grace is None else self._default_grace

    @property
    def heartbeat_interval(self) -> float:
        """Seconds between heartbeats: several fit in the grace, so a short grace (a few
        seconds) neither flaps between heartbeats nor turns on one missed answer."""
        return min(HEARTBEAT_INTERVAL, self.grace / HEARTBEATS_PER_GRACE)

    @property
    def name(self) -> str:
        return self.record.name

    def _set(self, state: NodeState, message: str, *, connected: bool = False) -> None:
        changed = state != self.state
        self.state = state
        if changed or message:
            self._on_change(self, message, connected)

    def _answered(self) -> None:
        self._last_contact = time.monotonic()
        self.last_seen_unix_nano = time.time_ns()
        self._contact.set()

    def _silent_for(self) -> float:
        return time.monotonic() - self._last_contact

    async def open(self) -> None:
        """Connect once, raising what went wrong (used by `node add`)."""
        channel = await self.transport.connect()
        # Calls ended by the channel's close say why the connection went (last_error).
        client = AgentClient(channel, self.name, lambda: self.last_error)
        try:
            self.info = await client.info()
        except BaseException:
            await self.transport.close()
            raise
        self._connected(client)

    def _connected(self, client: AgentClient) -> None:
        self._client = client
        self.last_error = ""
        self._answered()
        self._ready.set()
        self._set(NodeState.READY, "connected", connected=True)

    def supervise(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=f"node-{self.name}")
            self._watchdog = asyncio.create_task(self._guard(), name=f"node-{self.name}-grace")

    async def _guard(self) -> None:
        """Turn a `ready` node `disconnected` once it has been silent for its grace period."""
        while True:
            left = self._last_contact + self.grace - time.monotonic()
            if left > 0:
                await asyncio.sleep(left)  # an answer meanwhile moves the deadline: look again
                continue
            if self.state == NodeState.READY:
                why = f"no answer for {self.grace:g} s"
                self._set(
                    NodeState.DISCONNECTED, f"{why}: {self.last_error}" if self.last_error else why
                )
                self._silent.set()  # the watch tears the connection down, ending its calls
            self._contact.clear()
            await self._contact.wait()

    async def _loop(self) -> None:
        backoff = BACKOFF_INITIAL
        while True:
            if self._client is None:
                try:
                    await self.open()
                except VendettaError as exc:
                    self.last_error = str(exc)
                    log.warning("node %s: %s", self.name, exc)
                except Exception as exc:  # never let one node's bug kill supervision
                    self.last_error = f"unexpected: {exc!r}"
                    log.exception("node %s: connect failed", self.name)
                self._attempted.set()
            if self._client is not None:
                backoff = BACKOFF_INITIAL
                reason = await self._watch(self._client)
                self.last_error = reason
                self._client = None
                self._ready.clear()
                await self.transport.close()
            if self.state == NodeState.READY:
                # Within the grace: reconnect quietly, keep the node and its workspaces as
                # they are; the watchdog says `disconnected` if the silence lasts.
                log.info("node %s: %s; reconnecting", self.name, self.last_error)
                self._set(NodeState.READY, f"{self.last_error}; reconnecting")
            else:
                self._set(NodeState.DISCONNECTED, self.last_error)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _watch(self, client: AgentClient) -> str:
        """Heartbeat until the connection drops or the node fell silent past its grace;
        return why. A missed heartbeat alone keeps the connection (streams, forwards)."""
        closed = asyncio.create_task(self.transport.wait_closed())
        self._silent.clear()
        silent = asyncio.create_task(self._silent.wait())
        try:
            while True:
                done, _ = await asyncio.wait(
                    {closed, silent},
                    timeout=self.heartbeat_interval,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if closed in done:
                    return "connection lost"
                if silent in done:
                    return f"no answer for {self.grace:g} s"
                t0 = time.perf_counter()
                try:
                    # An answer later than the grace comes too late anyway.
                    await client.heartbeat(timeout=min(HEARTBEAT_TIMEOUT, self.grace))
                except VendettaError as exc:
                    self.last_error = f"heartbeat missed: {exc}"
                    log.info("node %s: %s", self.name, self.last_error)
                else:
                    self.latency_seconds = time.perf_counter() - t0
                    self.last_error = ""
                    self._answered()
                if self.state != NodeState.READY:  # silent past the grace: start afresh
                    return f"no answer for {self.grace:g} s"
        finally:
            for task in (closed, silent):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def reconnect(self, timeout: float) -> None:
        """Drop the connection and wait for supervision's next attempt (`node upgrade`:
        connecting installs and starts the coordinator's build); its error if it failed."""
        self._attempted.clear()
        await self.transport.close()  # supervision sees it closed and connects again
        try:
            await asyncio.wait_for(self._attempted.wait(), timeout)
        except TimeoutError:
            raise NodeUnreachableError(
                f"node {self.name!r} did not reconnect within {timeout:g} s"
                + (f": {self.last_error}" if self.last_error else "")
            ) from None
        if self._client is None:
            raise NodeUnreachableError(
                f"node {self.name!r}: reconnecting failed: {self.last_error}"
            )

    async def client(self, wait: float = 5.0) -> AgentClient:
        """The agent client, waiting briefly for a reconnect in progress."""
        if self._client is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), wait)
        # Declared silent, its connection not yet torn down (that waits for the watch to
        # wake): a call through it would only hang until then.
        if self._client is None or self.state == NodeState.DISCONNECTED:
            why = f": {self.last_error}" if self.last_error else ""
            raise NodeUnreachableError(
                f"node {self.name!r} is disconnected{why}. Its workspaces are untouched; "
                f"check it with `vendetta node status {self.name}` and retry when it is back"
            )
        return self._client

    async def close(self) -> None:
        for task in (self._task, self._watchdog):
            if task is not None:
                task.cancel()
                # Bounded: a cancellation lost on the way (3.11's wait_for can drop one)
                # must not hang the coordinator's stop.
                await asyncio.wait({task}, timeout=CLOSE_WAIT)
                if not task.done():
                    log.warning(
                        "node %s: supervision did not stop within %gs", self.name, CLOSE_WAIT
                    )
        self._task = self._watchdog = None
        self._client = None
        self._ready.clear()
        await self.transport.close()


# How long close() waits for a cancelled supervision task.
CLOSE_WAIT = 5.0


class NodeRegistry:
    def __init__(
        self,
        transport_factory: Callable[[NodeRecord], Transport],
        grace: float | None = None,
    ) -> None:
        self._nodes: dict[str, NodeConnection] = {}
        self._transport_factory = transport_factory
        self.grace = DEFAULT_GRACE if grace is None else grace  # for nodes without their own
        self.events: EventBus[NodeEvent] = EventBus()
        self._on_ready: list[Callable[[NodeConnection], Coroutine[Any, Any, None]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def on_ready(self, callback: Callable[[NodeConnection], Coroutine[Any, Any, None]]) -> None:
        self._on_ready.append(callback)

    def _changed(self, node: NodeConnection, message: str, connected: bool) -> None:
        self.events.publish(NodeEvent(node, message, time.time_ns()))
        if connected:
            for cb in self._on_ready:
                task = asyncio.create_task(cb(node))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def connection(self, record: NodeRecord) -> NodeConnection:
        return NodeConnection(record, self._transport_factory(record), self._changed, self.grace)

    def add(self, conn: NodeConnection) -> None:
        self._nodes[conn.name] = conn
        conn.supervise()

    def get(self, name: str) -> NodeConnection:
        try:
            return self._nodes[name]
        except KeyError:
            validate_name("node", name)  # a bad name: the rule, not "add it with" it
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
