"""The error tree <-> gRPC status seam, through a real agent server on a unix socket."""

from __future__ import annotations

import shutil
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass

import grpc
import grpc.aio
import pytest

from common import errors as e
from common.rpc_errors import from_rpc_error, mapped_rpc_errors, status_code_for
from coordinator.agent_client import AgentClient
from nodeagent.providers import ProviderSet
from nodeagent.server import AgentServer
from providers.base import EnvironmentStatus, ExecChunk, LogRecord
from tests.support.fakes import FakeProvider, short_tmp_dir
from tests.support.rpc import rpc_error
from vendetta.v1 import nodeagent_pb2, nodeagent_pb2_grpc

CASES: list[tuple[type[e.VendettaError], grpc.StatusCode]] = [
    (e.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (e.ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (e.NotFoundError, grpc.StatusCode.NOT_FOUND),
    (e.ImageNotFoundError, grpc.StatusCode.NOT_FOUND),
    (e.AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (e.FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (e.HostKeyMismatchError, grpc.StatusCode.FAILED_PRECONDITION),
    (e.NotRunningError, grpc.StatusCode.FAILED_PRECONDITION),
    (e.PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (e.UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (e.NodeUnreachableError, grpc.StatusCode.UNAVAILABLE),
    (e.EngineUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (e.DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (e.InternalError, grpc.StatusCode.INTERNAL),
]


def _leaves(cls: type[e.VendettaError]) -> set[type[e.VendettaError]]:
    # The tree of common.errors; an engine's private refinements (LXD's BusyError)
    # never leave the engine and travel as their parent's code.
    subs = {c for sub in cls.__subclasses__() for c in _leaves(sub)}
    return ({cls} if cls.__module__ == "common.errors" else set()) | subs


def test_cases_cover_the_whole_tree() -> None:
    assert {cls for cls, _ in CASES} == _leaves(e.VendettaError) - {e.VendettaError}


@pytest.mark.parametrize(("cls", "code"), CASES, ids=[c.__name__ for c, _ in CASES])
def test_status_code_for(cls: type[e.VendettaError], code: grpc.StatusCode) -> None:
    assert status_code_for(cls("x")) == code


class RaisingProvider(FakeProvider):
    """Raises ``errors[workspace]`` from inspect, exec and logs (the latter after some output)."""

    def __init__(self) -> None:
        super().__init__("rpc-errors")
        self.errors: dict[str, BaseException] = {}

    async def _inspect(self, workspace: str) -> EnvironmentStatus:
        raise self.errors[workspace]

    async def _exec(
        self, workspace: str, argv: Sequence[str], env: Mapping[str, str] | None, workdir: str
    ) -> AsyncGenerator[ExecChunk, None]:
        yield ExecChunk(stdout=b"partial output\n")
        raise self.errors[workspace]

    async def _logs(
        self, workspace: str, *, follow: bool, tail: int | None, since_unix_nano: int
    ) -> AsyncGenerator[LogRecord, None]:
        for i in range(3):
            yield LogRecord(time.time_ns(), "stdout", f"line {i}")
        raise self.errors[workspace]


@dataclass
class Agent:
    provider: RaisingProvider
    channel: grpc.aio.Channel
    stub: nodeagent_pb2_grpc.NodeAgentAsyncStub


@pytest.fixture
async def agent() -> AsyncIterator[Agent]:
    """A real AgentServer (ErrorMappingInterceptor included) over a RaisingProvider."""
    root = short_tmp_dir()
    provider = RaisingProvider()
    server = AgentServer(root / "agent", providers=ProviderSet({"docker": provider}))
    await server.start()
    channel = grpc.aio.insecure_channel(f"unix:{server.socket}")
    try:
        yield Agent(provider, channel, nodeagent_pb2_grpc.NodeAgentStub(channel))
    finally:
        await channel.close(None)
        await server.stop(grace=0.2)
        shutil.rmtree(root, ignore_errors=True)


def _req(workspace: str) -> nodeagent_pb2.EnvironmentRequest:
    return nodeagent_pb2.EnvironmentRequest(workspace=workspace, provider="docker")


@pytest.mark.parametrize(("cls", "code"), CASES, ids=[c.__name__ for c, _ in CASES])
async def test_unary_error_mapping(
    agent: Agent, cls: type[e.VendettaError], code: grpc.StatusCode
) -> None:
    provider, stub = agent.provider, agent.stub
    message = f"{cls.__name__} happened: do something about it"
    provider.errors["ws"] = cls(message)

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.InspectEnvironment(_req("ws"))
    assert info.value.code() == code
    assert info.value.details() == message
    back = from_rpc_error(info.value)
    assert type(back) is cls
    assert back.message == message

    # The same through the coordinator's typed client (mapped_rpc_errors).
    with pytest.raises(cls) as mapped:
        await AgentClient(agent.channel).inspect("ws", "docker")
    assert type(mapped.value) is cls
    assert str(mapped.value) == message


async def test_unexpected_exception_is_internal_and_says_it_is_a_bug(agent: Agent) -> None:
    provider, stub = agent.provider, agent.stub
    provider.errors["ws"] = RuntimeError("kaboom")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.InspectEnvironment(_req("ws"))
    assert info.value.code() == grpc.StatusCode.INTERNAL
    details = info.value.details() or ""
    assert "this is a bug" in details
    assert "kaboom" in details
    assert type(from_rpc_error(info.value)) is e.InternalError


@pytest.mark.parametrize(
    ("cls", "code"),
    [
        (e.NotFoundError, grpc.StatusCode.NOT_FOUND),
        (e.ImageNotFoundError, grpc.StatusCode.NOT_FOUND),
        (e.EngineUnavailableError, grpc.StatusCode.UNAVAILABLE),
        (e.HostKeyMismatchError, grpc.StatusCode.FAILED_PRECONDITION),
        (e.NotRunningError, grpc.StatusCode.FAILED_PRECONDITION),
    ],
)
async def test_stream_error_after_items(
    agent: Agent, cls: type[e.VendettaError], code: grpc.StatusCode
) -> None:
    provider, stub = agent.provider, agent.stub
    provider.errors["ws"] = cls("the stream broke")

    lines: list[str] = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for batch in stub.StreamLogs(
            nodeagent_pb2.AgentLogsRequest(workspace="ws", provider="docker")
        ):
            lines.extend(line.text for line in batch.lines)
    assert lines == ["line 0", "line 1", "line 2"]
    assert info.value.code() == code
    assert info.value.details() == "the stream broke"
    assert type(from_rpc_error(info.value)) is cls

    outputs: list[bytes] = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for out in stub.Exec(
            nodeagent_pb2.ExecRequest(workspace="ws", provider="docker", argv=["x"])
        ):
            outputs.append(out.stdout)
    assert outputs == [b"partial output\n"]
    assert info.value.code() == code
    assert type(from_rpc_error(info.value)) is cls


async def test_stream_unexpected_exception_is_internal(agent: Agent) -> None:
    provider, stub = agent.provider, agent.stub
    provider.errors["ws"] = KeyError("nope")
    outputs = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for out in stub.Exec(
            nodeagent_pb2.ExecRequest(workspace="ws", provider="docker", argv=["x"])
        ):
            outputs.append(out)
    assert len(outputs) == 1
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "this is a bug" in (info.value.details() or "")


async def test_agent_validation_errors(agent: Agent) -> None:
    stub = agent.stub
    spec = nodeagent_pb2.EnvironmentSpec(workspace="Bad Name", provider="docker", image="x")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.CreateEnvironment(nodeagent_pb2.CreateEnvironmentRequest(spec=spec))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "invalid workspace name" in (info.value.details() or "")

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.InspectEnvironment(
            nodeagent_pb2.EnvironmentRequest(workspace="ws", provider="lxd")
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "available: docker" in (info.value.details() or "")


def test_from_rpc_error_without_details_or_with_unknown_codes() -> None:
    unavailable = from_rpc_error(rpc_error(grpc.StatusCode.UNAVAILABLE, ""))
    assert type(unavailable) is e.UnavailableError
    assert "not answering" in unavailable.message

    cancelled = from_rpc_error(rpc_error(grpc.StatusCode.CANCELLED, "client went away"))
    assert type(cancelled) is e.UnavailableError
    assert "cancelled" in cancelled.message

    unknown = from_rpc_error(rpc_error(grpc.StatusCode.DATA_LOSS, "lost"))
    assert type(unknown) is e.InternalError
    assert unknown.message == "lost"

    # An unknown kind tag falls back to the status code's class.
    tagged = from_rpc_error(
        rpc_error(grpc.StatusCode.NOT_FOUND, "gone", (("vendetta-error", "SomethingNew"),))
    )
    assert type(tagged) is e.NotFoundError


def test_mapped_rpc_errors_keeps_the_cause() -> None:
    original = rpc_error(grpc.StatusCode.ALREADY_EXISTS, "taken")
    with pytest.raises(e.AlreadyExistsError) as info, mapped_rpc_errors():
        raise original
    assert info.value.__cause__ is original
    assert info.value.message == "taken"
