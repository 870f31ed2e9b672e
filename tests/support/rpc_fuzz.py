"""The harness of tests/unit/test_fuzz_rpc.py: servers on a loop of their own thread,
one generic call of any method from its descriptor, and what a call may end with."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import unicodedata
from collections.abc import Coroutine
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from tests.support.fakes import Cluster
from vendetta.v1 import coordinator_pb2 as pb
from vendetta.v1 import nodeagent_pb2

# What a call may end with: an answer, or one of the errors the error tree maps to.
EXPECTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.UNIMPLEMENTED,
}
CALL_TIMEOUT = 20.0  # a unary answer later than this is a hang
READ_IDLE = 0.3  # a stream quiet this long is waiting for events: enough read
MAX_READS = 8
MAX_MESSAGE = 2100  # characters: a status is a few lines (the wire cuts at 2000)


def key(method: MethodDescriptor) -> str:
    return f"{method.containing_service.name}/{method.name}"


T = TypeVar("T")


class _Errors(logging.Handler):
    """The servers' error log: an unexpected exception in a handler is logged there
    (common/rpc_errors.py, grpc's own server) whatever reached the client."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def take(self) -> list[str]:
        found = [
            f"{r.name}: {r.getMessage()} {r.exc_info[1]!r}"
            if r.exc_info
            else f"{r.name}: {r.getMessage()}"
            for r in self.records
        ]
        self.records.clear()
        return found


class World:
    """Servers on an event loop of their own thread, so hypothesis drives them from sync
    tests (examples share them: state a call leaves is the next one's starting point).
    ``servers`` is entered on that loop: a cluster (running_cluster) or anything that
    serves an agent, whose socket ``open_agent_channel`` is then given."""

    def __init__(self, servers: AbstractAsyncContextManager[Any]) -> None:
        self.errors = _Errors()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._cm = servers
        self.target: Any = self.run(self._cm.__aenter__())
        self._agent_channel: grpc.aio.Channel | None = None
        logging.getLogger().addHandler(self.errors)

    @property
    def cluster(self) -> Cluster:
        assert isinstance(self.target, Cluster), "not a cluster"
        return self.target

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        logging.getLogger().removeHandler(self.errors)
        try:
            if self._agent_channel is not None:
                self.run(self._agent_channel.close(None))
            self.run(self._cm.__aexit__(None, None, None))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    def channel(self, method: MethodDescriptor) -> grpc.aio.Channel:
        if method.containing_service.name == "Coordinator":
            return self.cluster._channel  # type: ignore[return-value]
        assert self._agent_channel is not None, "open_agent_channel first"
        return self._agent_channel

    async def open_agent_channel(self, socket: str | Path) -> None:
        self._agent_channel = grpc.aio.insecure_channel(f"unix:{socket}")


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    details: str
    # The client was still sending when the server ended the call: grpc's client then
    # reports INTERNAL "Internal error from Core" instead of the server's status
    # (grpc/aio/_call.py, _write); the server's own errors are in its log.
    raced: bool = False


async def call_method(
    channel: grpc.aio.Channel, method: MethodDescriptor, requests: list[Message]
) -> Outcome:
    path = f"/{method.containing_service.full_name}/{method.name}"
    reply = GetMessageClass(method.output_type)
    kw: Any = {
        "request_serializer": lambda m: m.SerializeToString(),
        "response_deserializer": reply.FromString,
    }
    raced = False
    factory: Any
    if method.client_streaming:
        factory = channel.stream_stream if method.server_streaming else channel.stream_unary
        call: Any = factory(path, **kw)(timeout=CALL_TIMEOUT)
        pending = list(requests)
        if method.server_streaming and pending:
            # As our clients do: the first message, then more once the server has
            # answered it (a session is open) — or not, if it ended the call.
            raced = not await _write(call, [pending.pop(0)])
            first = await _read(call)
            if first is not None:
                return first
        raced = raced or not await _write(call, pending)
    else:
        factory = channel.unary_stream if method.server_streaming else channel.unary_unary
        call = factory(path, **kw)(requests[0], timeout=CALL_TIMEOUT)
    if method.server_streaming:
        for _ in range(MAX_READS):
            end = await _read(call)
            if end is not None:
                return replace(end, raced=raced)
        call.cancel()
        return Outcome(grpc.StatusCode.OK, "")
    with contextlib.suppress(grpc.aio.AioRpcError):
        await call
    return Outcome(await call.code(), await call.details() or "", raced)


async def _write(call: Any, requests: list[Message]) -> bool:
    """Send, then half-close; False if the server had ended the call meanwhile."""
    try:
        for r in requests:
            if call.done():
                return False
            await call.write(r)
        await call.done_writing()
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        return False
    return True


async def _read(call: Any) -> Outcome | None:
    """One message of a stream: None if one came (or none yet: a watch waits for
    events, so the call is ended here), else how the call ended."""
    try:
        msg = await asyncio.wait_for(call.read(), READ_IDLE)
    except TimeoutError:
        call.cancel()
        return Outcome(grpc.StatusCode.OK, "")
    except grpc.aio.AioRpcError:
        msg = grpc.aio.EOF  # type: ignore[attr-defined]
    if msg is not grpc.aio.EOF:  # type: ignore[attr-defined]
        return None
    return Outcome(await call.code(), await call.details() or "")


def _unreadable(text: str) -> list[str]:
    bad = {c for c in text if unicodedata.category(c) in ("Cc", "Cf") and c not in "\n\t"}
    return sorted(repr(c) for c in bad)


CORE = "Internal error from Core"


def check(
    method: MethodDescriptor, requests: list[Message], outcome: Outcome, errors: list[str]
) -> None:
    where = f"{key(method)} with {[str(r)[:300] for r in requests]}"
    assert not errors, f"{where}: the server logged {errors}"
    code, details = outcome.code, outcome.details
    if outcome.raced and code == grpc.StatusCode.INTERNAL and details == CORE:
        return  # the client's view, not the server's (see Outcome.raced)
    assert code in EXPECTED, f"{where}: ended {code.name}: {details[:500]}"
    if code != grpc.StatusCode.OK:
        assert details.strip(), f"{where}: {code.name} with no message"
        assert "Traceback" not in details and "this is a bug" not in details, (where, details)
        assert len(details) <= MAX_MESSAGE, f"{where}: a {len(details)}-character message"
        assert not _unreadable(details), f"{where}: raw {_unreadable(details)} in {details!r}"


async def healthy(world: World) -> None:
    """Both servers still answer (the coordinator's, if there is one)."""
    if isinstance(world.target, Cluster):
        await world.cluster.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    assert world._agent_channel is not None
    agent = world._agent_channel.unary_unary(
        "/vendetta.v1.NodeAgent/Heartbeat",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=nodeagent_pb2.HeartbeatResponse.FromString,
    )
    await agent(nodeagent_pb2.HeartbeatRequest(), timeout=10)
