"""Fuzzing: every RPC of the Coordinator and NodeAgent services, with generated messages.

A real coordinator and real agents (over fake providers, tests/support/fakes.py) serve
on their unix sockets; each method is called with messages drawn from its request type
(tests/support/proto_strategies.py), streams with a few messages then the end. Each
call must end in an expected status code with a short, printable message (an
unhandled exception is UNKNOWN, or INTERNAL "... (this is a bug)" through
common/rpc_errors.py), and both servers must answer afterwards.

The methods come from the service descriptors, so a new RPC is fuzzed without a change
here; it must also be listed in DRIVERS, which says what its generated input must be
kept from (the network, the machine's files) before it is let loose.

Budget: VENDETTA_FUZZ_EXAMPLES examples per method (default 10); e.g.
`VENDETTA_FUZZ_EXAMPLES=500 .venv/bin/python -m pytest tests/unit/test_fuzz_rpc.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import unicodedata
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import grpc
import grpc.aio
import pytest
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.source_git import is_url
from tests.support.fakes import Cluster, running_cluster, ssh_public_key_line
from tests.support.proto_strategies import ODD_STRINGS, messages, odd_text
from vendetta.v1 import common_pb2, coordinator_pb2, nodeagent_pb2
from vendetta.v1 import coordinator_pb2 as pb

EXAMPLES = int(os.environ.get("VENDETTA_FUZZ_EXAMPLES", "10"))
COORDINATOR = coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"]
AGENT = nodeagent_pb2.DESCRIPTOR.services_by_name["NodeAgent"]
NODES = ("local", "node1", "node2")
# Names that reach past the checks: nodes, the running workspace, the fake's provider.
KNOWN = (*NODES, "ws1", "ws2", "docker", "lxd", "qemu", "setup", "teardown")
TEXT = odd_text(KNOWN)
HOST_KEY = ssh_public_key_line()

# Loopback only, or strings that fail before any lookup (no DNS query leaves the machine).
LOOPBACK = st.sampled_from(["127.0.0.1", "::1", "", "a\x00b", "x" * 20_000, "-oProxyCommand=id"])
# Never a git URL (a clone would reach the network); folders that do not exist, or /tmp.
SOURCE = st.one_of(
    st.sampled_from(["", "/tmp", "/nonexistent-vd-fuzz", "file:///nonexistent-vd-fuzz"]),
    TEXT.filter(lambda s: not is_url(s)),
)
KEY = st.one_of(st.just(HOST_KEY), TEXT)


@dataclass(frozen=True)
class Driver:
    """How to fuzz one method: fields kept in bounds, and a word on why."""

    fields: dict[str, st.SearchStrategy[Any]]
    why: str = ""


def _plain(why: str = "") -> Driver:
    return Driver({}, why)


# Every method, by "Service/Method". A new one fails test_every_method_has_a_driver until
# someone has checked where its input can lead (a host to reach, a file to write).
DRIVERS: dict[str, Driver] = {
    "Coordinator/GetServerInfo": _plain(),
    "Coordinator/ScanHostKey": Driver({"address": LOOPBACK}, "connects to the address"),
    "Coordinator/AddNode": Driver(
        {"host_key": KEY, "identity_file": st.sampled_from(["", "/nonexistent", "/etc"])},
        "fake transports: a node without an agent is unreachable",
    ),
    "Coordinator/ListNodes": _plain(),
    "Coordinator/GetNode": _plain(),
    "Coordinator/TestNode": _plain(),
    "Coordinator/RemoveNode": Driver(
        {"name": odd_text(("local", "node2", "ghost"))}, "node1 keeps the running workspace"
    ),
    "Coordinator/UpgradeNodes": _plain("fake transports reconnect in-process"),
    "Coordinator/TrustNode": Driver({"host_key": KEY}),
    "Coordinator/WatchNodes": _plain("endless: read while it answers"),
    "Coordinator/CreateWorkspace": Driver({"source": SOURCE}, "a git URL would be cloned"),
    "Coordinator/UpWorkspace": _plain(),
    "Coordinator/DownWorkspace": _plain(),
    "Coordinator/DestroyWorkspace": _plain(),
    "Coordinator/GetWorkspace": _plain(),
    "Coordinator/ListWorkspaces": _plain(),
    "Coordinator/WatchWorkspace": _plain("endless"),
    "Coordinator/StreamLogs": _plain("follow is endless"),
    "Coordinator/ExecWorkspace": _plain("the fake provider echoes argv"),
    "Coordinator/GetConnectionInfo": _plain(),
    "Coordinator/Connect": _plain("the fake provider has no terminal"),
    "Coordinator/Dial": _plain("relayed to the agent's Dial"),
    "Coordinator/Listen": _plain("relayed to the agent's Listen"),
    "Coordinator/ListImages": _plain(),
    "Coordinator/ImportImage": _plain("spooled in the agent's folder"),
    "Coordinator/PushWorkspace": _plain(),
    "Coordinator/PullWorkspace": _plain(),
    "Coordinator/CreateToken": _plain("kept in the coordinator's state"),
    "Coordinator/ListTokens": _plain(),
    "Coordinator/RevokeToken": _plain(),
    "NodeAgent/Info": _plain(),
    "NodeAgent/Heartbeat": _plain(),
    "NodeAgent/Sink": _plain(),
    "NodeAgent/CreateEnvironment": _plain("in the fake provider's memory"),
    "NodeAgent/StartEnvironment": _plain(),
    "NodeAgent/StopEnvironment": _plain(),
    "NodeAgent/DestroyEnvironment": _plain(),
    "NodeAgent/InspectEnvironment": _plain(),
    "NodeAgent/ListEnvironments": _plain(),
    "NodeAgent/Exec": _plain(),
    "NodeAgent/StreamLogs": _plain(),
    "NodeAgent/StartServices": _plain("the fake provider runs nothing"),
    "NodeAgent/StopServices": _plain(),
    "NodeAgent/GetServices": _plain(),
    "NodeAgent/WatchServices": _plain("endless"),
    "NodeAgent/RunHook": _plain(),
    "NodeAgent/Attach": _plain(),
    "NodeAgent/Dial": _plain("through provider.pipe: the fake provider has no stdin"),
    "NodeAgent/Listen": _plain("inside the environment: the fake provider runs nothing"),
    "NodeAgent/ListImages": _plain(),
    "NodeAgent/ImportImage": _plain(),
    "NodeAgent/PutSource": _plain("written under the agent's folder (names checked)"),
    "NodeAgent/GetSource": _plain(),
    "NodeAgent/DeleteSource": _plain(),
}

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
INVALID = grpc.StatusCode.INVALID_ARGUMENT
CALL_TIMEOUT = 20.0  # a unary answer later than this is a hang
READ_IDLE = 0.3  # a stream quiet this long is waiting for events: enough read
MAX_READS = 8
MAX_MESSAGE = 1000  # characters: a status is a line or two, not an echo of the input


def _methods(service: ServiceDescriptor) -> list[MethodDescriptor]:
    return list(service.methods)


def _key(method: MethodDescriptor) -> str:
    return f"{method.containing_service.name}/{method.name}"


ALL = [*_methods(COORDINATOR), *_methods(AGENT)]


# ------------------------------------------------------------------------ the servers


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
    """A cluster on an event loop of its own thread, so hypothesis drives it from sync
    tests (examples share it: state a call leaves is the next one's starting point)."""

    def __init__(self) -> None:
        self.errors = _Errors()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._cm = running_cluster(NODES)
        self.cluster: Cluster = self.run(self._cm.__aenter__())
        logging.getLogger().addHandler(self.errors)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        logging.getLogger().removeHandler(self.errors)
        try:
            self.run(self._cm.__aexit__(None, None, None))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    def channel(self, service: ServiceDescriptor) -> grpc.aio.Channel:
        if service is COORDINATOR:
            return self.cluster._channel  # type: ignore[return-value]
        return self._agent_channel

    async def open_agent_channel(self) -> None:
        sock = self.cluster.agents["node1"].server.socket
        self._agent_channel = grpc.aio.insecure_channel(f"unix:{sock}")


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    w = World()
    try:
        w.run(w.open_agent_channel())
        w.run(_restore(w.cluster))
        yield w
    finally:
        with contextlib.suppress(Exception):
            w.run(w._agent_channel.close(None))
        w.close()


async def _restore(cluster: Cluster) -> None:
    """ws1 running on node1 again, whatever the last example did (best effort)."""
    stub = cluster.stub
    with contextlib.suppress(grpc.aio.AioRpcError):
        try:
            ws = await stub.GetWorkspace(pb.GetWorkspaceRequest(name="ws1"), timeout=5)
        except grpc.aio.AioRpcError:
            ws = await stub.CreateWorkspace(
                pb.CreateWorkspaceRequest(name="ws1", node="node1"), timeout=5
            )
        if ws.state != pb.WORKSPACE_STATE_RUNNING:
            await stub.UpWorkspace(pb.WorkspaceRequest(name="ws1"), timeout=5)


# ------------------------------------------------------------------------ one call


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    details: str
    # The client was still sending when the server ended the call: grpc's client then
    # reports INTERNAL "Internal error from Core" instead of the server's status
    # (grpc/aio/_call.py, _write); the server's own errors are in its log.
    raced: bool = False


async def _call(
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
    where = f"{_key(method)} with {[str(r)[:300] for r in requests]}"
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


async def _healthy(world: World) -> None:
    await world.cluster.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    agent = world._agent_channel.unary_unary(
        "/vendetta.v1.NodeAgent/Heartbeat",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=nodeagent_pb2.HeartbeatResponse.FromString,
    )
    await agent(nodeagent_pb2.HeartbeatRequest(), timeout=10)


def _requests(method: MethodDescriptor) -> st.SearchStrategy[list[Message]]:
    driver = DRIVERS.get(_key(method), _plain())
    one = messages(method.input_type, fields=driver.fields, text=TEXT)
    if not method.client_streaming:
        return st.lists(one, min_size=1, max_size=1)
    return st.lists(one, max_size=4)  # none at all: a stream closed at once


# ------------------------------------------------------------------------ the tests


def test_every_method_has_a_driver() -> None:
    missing = [_key(m) for m in ALL if _key(m) not in DRIVERS]
    assert not missing, f"add these RPCs to DRIVERS (checking where their input leads): {missing}"


def test_odd_strings_are_valid_protobuf_strings() -> None:
    # Protobuf refuses strings that are not UTF-8 (lone surrogates): the fuzzer must not.
    for s in ODD_STRINGS:
        pb.GetNodeRequest(name=s).SerializeToString()


@pytest.mark.parametrize("method", ALL, ids=_key)
def test_rpc_survives_generated_messages(world: World, method: MethodDescriptor) -> None:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(requests=_requests(method))
    def fuzz(requests: list[Message]) -> None:
        world.run(_restore(world.cluster))
        world.errors.take()
        outcome = world.run(_call(world.channel(method.containing_service), method, requests))
        check(method, requests, outcome, world.errors.take())
        world.run(_healthy(world))

    fuzz()


def test_attach_streams_that_do_not_start_with_start(world: World) -> None:
    # Bidi streams whose first message is not `start`, or that end at once: refused.
    firsts = [
        [],
        [common_pb2.AttachInput(stdin=b"x")],
        [common_pb2.AttachInput(stdin_eof=True)],
        [common_pb2.AttachInput(resize=common_pb2.TerminalSize(rows=1, cols=1))],
        [common_pb2.AttachInput()],
    ]
    for service in (COORDINATOR, AGENT):
        method = service.methods_by_name["Connect" if service is COORDINATOR else "Attach"]
        for requests in firsts:
            world.errors.take()
            outcome = world.run(_call(world.channel(service), method, list(requests)))
            check(method, list(requests), outcome, world.errors.take())
            assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, (requests, outcome)


# Found by the fuzzing above; each case once, whatever the generator draws next time.
REGRESSIONS: list[tuple[ServiceDescriptor, str, Message, grpc.StatusCode]] = [
    # The resolver and the socket raised ValueError (INTERNAL "this is a bug").
    (COORDINATOR, "ScanHostKey", pb.ScanHostKeyRequest(address="a\x00b"), INVALID),
    (COORDINATOR, "ScanHostKey", pb.ScanHostKeyRequest(address="x" * 300), INVALID),
    (COORDINATOR, "ScanHostKey", pb.ScanHostKeyRequest(address="127.0.0.1", port=-1), INVALID),
    (COORDINATOR, "ScanHostKey", pb.ScanHostKeyRequest(address="::1", port=70000), INVALID),
    (COORDINATOR, "AddNode", pb.AddNodeRequest(name="n9", address="h", port=2**31 - 1), INVALID),
    # Echoed whole, these went over gRPC's 16 KiB status limit: RESOURCE_EXHAUSTED.
    (COORDINATOR, "GetNode", pb.GetNodeRequest(name="x" * 20_000), INVALID),
    (
        AGENT,
        "InspectEnvironment",
        nodeagent_pb2.EnvironmentRequest(workspace="ws1", provider="x" * 20_000),
        INVALID,
    ),
    (
        AGENT,
        "RunHook",
        nodeagent_pb2.RunHookRequest(workspace="ws1", provider="docker", name="x" * 20_000),
        INVALID,
    ),
    (
        AGENT,
        "StartServices",
        nodeagent_pb2.StartServicesRequest(
            workspace="ws1",
            provider="docker",
            services=[common_pb2.ServiceSpec(name="x" * 20_000)],
        ),
        INVALID,
    ),
]


@pytest.mark.parametrize(
    ("service", "name", "request_", "code"),
    REGRESSIONS,
    ids=[f"{r[1]}-{i}" for i, r in enumerate(REGRESSIONS)],
)
def test_regression(
    world: World,
    service: ServiceDescriptor,
    name: str,
    request_: Message,
    code: grpc.StatusCode,
) -> None:
    method = service.methods_by_name[name]
    world.errors.take()
    outcome = world.run(_call(world.channel(service), method, [request_]))
    check(method, [request_], outcome, world.errors.take())
    assert outcome.code == code, outcome
