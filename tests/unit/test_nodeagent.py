"""The agent server over a FakeProvider, and the fake's own contract (providers.base)."""

from __future__ import annotations

import asyncio
import shutil
import stat
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from common.errors import AlreadyExistsError, FailedPreconditionError, NotFoundError
from nodeagent.providers import ProviderSet
from nodeagent.server import AgentServer
from providers.base import EnvironmentSpec, EnvState, LogRecord, Readiness
from tests.support.fakes import FakeProvider, short_tmp_dir, wait_until
from vendetta.v1 import common_pb2, nodeagent_pb2, nodeagent_pb2_grpc

# ----------------------------------------------------------------------------- the fake


async def test_fake_provider_follows_the_provider_contract() -> None:
    p = FakeProvider()
    spec = EnvironmentSpec(workspace="ws", image="img")
    assert (await p.inspect("ws")).state == EnvState.ABSENT

    created = await p.create(spec)
    assert created.state == EnvState.CREATED
    with pytest.raises(AlreadyExistsError):
        await p.create(spec)

    assert (await p.start("ws")).state == EnvState.RUNNING
    assert (await p.start("ws")).state == EnvState.RUNNING  # idempotent
    assert (await p.stop("ws")).state == EnvState.STOPPED
    assert (await p.stop("ws")).state == EnvState.STOPPED  # idempotent
    assert [s.workspace for s in await p.list()] == ["ws"]

    await p.destroy("ws")
    await p.destroy("ws")  # absent is fine
    assert (await p.inspect("ws")).state == EnvState.ABSENT
    with pytest.raises(NotFoundError):
        await p.start("ws")


async def test_fake_provider_logs_follow_until_stopped() -> None:
    p = FakeProvider()
    await p.create(EnvironmentSpec(workspace="ws", image="img"))
    await p.start("ws")
    p.add_log("ws", "one")
    got: list[str] = []

    async def follow() -> None:
        async for rec in p.logs("ws", follow=True, tail=None):
            got.append(rec.text)

    task = asyncio.create_task(follow())
    await asyncio.sleep(0.02)
    # Tests may append to the recorded lines directly.
    p.environments["ws"].logs.append(LogRecord(0, "stdout", "two"))
    await asyncio.sleep(0.1)
    await p.stop("ws")
    await asyncio.wait_for(task, 5.0)
    assert got == ["one", "two"]
    assert p.active_log_streams == 0


# ----------------------------------------------------------------------------- the agent


@pytest.fixture
async def agent_dir() -> AsyncIterator[Path]:
    root = short_tmp_dir()
    try:
        yield root / "agent"
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def test_agent_socket_is_private_and_info_lists_providers(agent_dir: Path) -> None:
    provider = FakeProvider("a1")
    provider.readiness_value = Readiness(ready=False, detail="engine down: start it")
    server = AgentServer(agent_dir, providers=ProviderSet({"docker": provider}))
    await server.start()
    try:
        assert stat.S_IMODE(server.socket.stat().st_mode) == 0o600
        assert stat.S_IMODE(agent_dir.stat().st_mode) == 0o700
        async with grpc.aio.insecure_channel(f"unix:{server.socket}") as channel:
            stub = nodeagent_pb2_grpc.NodeAgentStub(channel)
            info = await stub.Info(nodeagent_pb2.InfoRequest())
            assert info.agent_id == server.agent_id
            assert info.socket_path == str(server.socket)
            assert [p.name for p in info.providers] == ["docker"]
            assert not info.providers[0].ready
            assert info.providers[0].detail == "engine down: start it"
            assert "long_exec_streams" in info.providers[0].capabilities
            # A provider that is not ready contributes no environments (and no error).
            envs = await stub.ListEnvironments(nodeagent_pb2.ListEnvironmentsRequest())
            assert list(envs.environments) == []
    finally:
        await server.stop(grace=0.2)
    assert provider.closed
    assert not server.socket.exists()


async def test_agent_id_is_stable_across_restarts(agent_dir: Path) -> None:
    first = AgentServer(agent_dir, providers=ProviderSet({"docker": FakeProvider()}))
    second = AgentServer(agent_dir, providers=ProviderSet({"docker": FakeProvider()}))
    assert first.agent_id == second.agent_id


async def test_second_agent_on_the_same_dir_is_refused(agent_dir: Path) -> None:
    first = AgentServer(agent_dir, providers=ProviderSet({"docker": FakeProvider()}))
    await first.start()
    try:
        second = AgentServer(agent_dir, providers=ProviderSet({"docker": FakeProvider()}))
        with pytest.raises(FailedPreconditionError, match="already running"):
            await second.start()
    finally:
        await first.stop(grace=0.2)


async def test_agent_environment_lifecycle_over_grpc(agent_dir: Path) -> None:
    provider = FakeProvider("a1")
    server = AgentServer(agent_dir, providers=ProviderSet({"docker": provider}))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"unix:{server.socket}") as channel:
            stub = nodeagent_pb2_grpc.NodeAgentStub(channel)
            spec = nodeagent_pb2.EnvironmentSpec(
                workspace="ws", provider="docker", image="img", env={"A": "1"}, cpus=2
            )
            env = await stub.CreateEnvironment(nodeagent_pb2.CreateEnvironmentRequest(spec=spec))
            assert env.state == common_pb2.ENVIRONMENT_STATE_CREATED
            assert provider.environments["ws"].spec.env == {"A": "1"}
            assert provider.environments["ws"].spec.cpus == 2
            assert provider.environments["ws"].spec.command is None  # empty: keep-alive

            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.CreateEnvironment(nodeagent_pb2.CreateEnvironmentRequest(spec=spec))
            assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS

            no_image = nodeagent_pb2.EnvironmentSpec(workspace="ws2", provider="docker")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.CreateEnvironment(nodeagent_pb2.CreateEnvironmentRequest(spec=no_image))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

            req = nodeagent_pb2.EnvironmentRequest(workspace="ws", provider="docker")
            env = await stub.StartEnvironment(req)
            assert env.state == common_pb2.ENVIRONMENT_STATE_RUNNING
            env = await stub.StopEnvironment(
                nodeagent_pb2.StopEnvironmentRequest(workspace="ws", provider="docker")
            )
            assert env.state == common_pb2.ENVIRONMENT_STATE_STOPPED
            await stub.DestroyEnvironment(req)
            env = await stub.InspectEnvironment(req)
            assert env.state == common_pb2.ENVIRONMENT_STATE_ABSENT
    finally:
        await server.stop(grace=0.2)


async def _events(call: AsyncIterable[common_pb2.ServiceEvent]) -> list[object]:
    return [ev async for ev in call]


async def test_a_watch_ends_when_the_agent_stops_not_after_the_grace(agent_dir: Path) -> None:
    """The coordinator watches the services of each running workspace: a stop waited its
    whole grace for those streams, which never end by themselves."""
    server = AgentServer(agent_dir, providers=ProviderSet({"docker": FakeProvider()}))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"unix:{server.socket}") as channel:
            stub = nodeagent_pb2_grpc.NodeAgentStub(channel)
            watch = stub.WatchServices(
                nodeagent_pb2.EnvironmentRequest(workspace="ws", provider="docker")
            )
            reading = asyncio.create_task(_events(watch))
            events = server.services.supervisor("ws", "docker").events
            await wait_until(lambda: bool(events._subscribers), "the watch to subscribe")
            # A grace far longer than the deadline: the stop ends the watch at once.
            await asyncio.wait_for(server.stop(grace=600), 30)
            assert await asyncio.wait_for(reading, 30) == []  # ended, not cancelled
    finally:
        await server.stop(grace=0.2)


async def test_health_checks_share_one_recent_inspect(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from nodeagent.services import manager
    from providers.base import Capabilities, EnvironmentStatus, EnvState

    calls: list[str] = []

    async def inspect(workspace: str) -> EnvironmentStatus:
        calls.append(workspace)
        return EnvironmentStatus(
            workspace=workspace,
            provider="fake",
            state=EnvState.RUNNING,
            addresses=("10.0.0.5",),
            ports={8080: f"127.0.0.1:{40000 + len(calls)}"},
        )

    provider = SimpleNamespace(capabilities=Capabilities(), inspect=inspect)
    env = manager.ProviderEnv(provider, "ws")  # type: ignore[arg-type]
    for _ in range(10):
        assert await env.endpoint(8080) == ("10.0.0.5", 8080)
    assert calls == ["ws"]
    # Checks asking at the same moment share the one call under way.
    monkeypatch.setattr(manager, "STATUS_TTL", -1.0)
    env._status = None
    together = await asyncio.gather(*(env.endpoint(8080) for _ in range(5)))
    assert together == [("10.0.0.5", 8080)] * 5 and len(calls) == 2
    monkeypatch.setattr(manager, "STATUS_TTL", 2.0)
    # Published ports change at each start: always asked afresh.
    assert await env.endpoint(8080, published=True) == ("127.0.0.1", 40003)
    assert await env.endpoint(8080, published=True) == ("127.0.0.1", 40004)
    monkeypatch.setattr(manager, "STATUS_TTL", -1.0)
    await env.endpoint(8080)
    assert len(calls) == 5
