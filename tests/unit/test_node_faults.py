"""Calls whose node goes away (issue 15): they end with an error naming the node, never
hang or surface as a bare cancellation; the CLI tells a coordinator it cannot reach
from what the coordinator says about a node. End to end: tests/e2e/test_node_faults.py.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest

from cli import client, runner
from common import errors as e
from coordinator.agent_client import AgentClient, NodeLostError
from coordinator.transports.base import CHANNEL_OPTIONS
from nodeagent.providers import ProviderSet
from nodeagent.server import AgentServer
from providers.base import EnvironmentSpec, EnvironmentStatus
from tests.support.fakes import Cluster, FakeProvider, short_tmp_dir, wait_until
from tests.support.rpc import rpc_error
from tests.unit.conftest import GRACE
from vendetta.v1 import coordinator_pb2 as pb
from vendetta.v1 import coordinator_pb2_grpc, nodeagent_pb2, nodeagent_pb2_grpc


@pytest.fixture
async def agent() -> AsyncIterator[AgentServer]:
    """A real agent server over a fake provider (environment "ws" running)."""
    root = short_tmp_dir()
    provider = FakeProvider("faults")
    await provider.create(EnvironmentSpec(workspace="ws", image="img"))
    await provider.start("ws")
    server = AgentServer(root / "agent", providers=ProviderSet({"docker": provider}))
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace=0.2)
        shutil.rmtree(root, ignore_errors=True)


async def _follow_forever(client: AgentClient) -> None:
    """A stream that runs until something ends it (logs -f of a quiet environment)."""
    stream = client.logs("ws", "docker", follow=True, tail=0, since_unix_nano=0, service="")
    async for _ in stream:
        pass


async def test_a_call_on_a_channel_closed_under_it_is_a_node_lost_error(
    agent: AgentServer,
) -> None:
    channel = grpc.aio.insecure_channel(f"unix:{agent.socket}", options=CHANNEL_OPTIONS)
    client = AgentClient(channel, "n1", lambda: "no answer for 3 s")
    call = asyncio.create_task(_follow_forever(client))
    await asyncio.sleep(0.3)
    await channel.close(None)  # what supervision does when the node's grace runs out
    with pytest.raises(NodeLostError) as info:
        await asyncio.wait_for(call, 5)
    assert info.value.node == "n1" and info.value.why == "no answer for 3 s"
    assert "node 'n1' stopped answering: no answer for 3 s" in str(info.value)


async def test_a_caller_cancelled_is_still_cancelled(agent: AgentServer) -> None:
    channel = grpc.aio.insecure_channel(f"unix:{agent.socket}", options=CHANNEL_OPTIONS)
    try:
        call = asyncio.create_task(_follow_forever(AgentClient(channel, "n1")))
        await asyncio.sleep(0.3)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    finally:
        await channel.close(None)


async def test_an_agent_gone_mid_call_is_a_node_lost_error_but_its_own_errors_are_not(
    agent: AgentServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = agent.providers.get("docker")
    channel = grpc.aio.insecure_channel(f"unix:{agent.socket}", options=CHANNEL_OPTIONS)
    client = AgentClient(channel, "n1")
    try:
        # The agent's own errors stay what they are, UNAVAILABLE ones too.
        with pytest.raises(e.InvalidArgumentError):
            await client.inspect("ws", "lxd")

        async def engine_down(workspace: str) -> None:
            raise e.UnavailableError("the engine is down: start it")

        monkeypatch.setattr(provider, "_inspect", engine_down)
        with pytest.raises(e.UnavailableError) as own:
            await client.inspect("ws", "docker")
        assert not isinstance(own.value, NodeLostError)
        assert str(own.value) == "the engine is down: start it"
        call = asyncio.create_task(_follow_forever(client))
        await asyncio.sleep(0.3)
        await agent.stop(grace=0)  # the agent dies under the call
        with pytest.raises(NodeLostError, match="node 'n1' stopped answering"):
            await asyncio.wait_for(call, 5)
    finally:
        await channel.close(None)


class _Hb(nodeagent_pb2_grpc.NodeAgentServicer):
    async def Heartbeat(
        self, request: nodeagent_pb2.HeartbeatRequest, context: object
    ) -> nodeagent_pb2.HeartbeatResponse:
        return nodeagent_pb2.HeartbeatResponse()


async def _serve(path: str) -> grpc.aio.Server:
    server = grpc.aio.server()
    nodeagent_pb2_grpc.add_NodeAgentServicer_to_server(_Hb(), server)  # type: ignore[abstract]
    server.add_insecure_port(f"unix:{path}")
    await server.start()
    return server


async def test_a_new_channel_does_not_inherit_a_broken_one() -> None:
    """Defect 1: a call object of the old connection kept alive (an error's traceback)
    kept gRPC's shared subchannel, failed, and the next channel to the same tunnel
    socket failed at once with its old error: the node never came back."""
    root = short_tmp_dir()
    path = str(root / "n.sock")
    server = await _serve(path)
    old = grpc.aio.insecure_channel(f"unix:{path}", options=CHANNEL_OPTIONS)
    kept: list[BaseException] = []
    try:
        stub = nodeagent_pb2_grpc.NodeAgentStub(old)
        await stub.Heartbeat(nodeagent_pb2.HeartbeatRequest(), timeout=5)
        await server.stop(None)
        (root / "n.sock").unlink(missing_ok=True)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.Heartbeat(nodeagent_pb2.HeartbeatRequest(), timeout=5)
        kept.append(failed.value)  # alive, as the coordinator's errors were
        await old.close(None)
        server = await _serve(path)
        async with grpc.aio.insecure_channel(f"unix:{path}", options=CHANNEL_OPTIONS) as new:
            stub = nodeagent_pb2_grpc.NodeAgentStub(new)
            await stub.Heartbeat(nodeagent_pb2.HeartbeatRequest(), timeout=5)
    finally:
        await server.stop(None)
        shutil.rmtree(root, ignore_errors=True)


async def test_a_stream_on_a_node_that_falls_silent_ends_naming_the_node(
    fast_reconnect: None, cluster: Cluster
) -> None:
    await cluster.stub.CreateWorkspace(pb.CreateWorkspaceRequest(name="ws1", node="node1"))
    await cluster.stub.UpWorkspace(pb.WorkspaceRequest(name="ws1"))

    async def follow() -> None:
        request = pb.StreamLogsRequest(name="ws1", follow=True)
        async for _ in cluster.stub.StreamLogs(request):
            pass

    stream = asyncio.create_task(follow())
    await asyncio.sleep(0.3)
    cluster.transport("node1").silent = True
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(stream, GRACE + 5)
    finally:
        cluster.transport("node1").silent = False
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "node 'node1' stopped answering" in (info.value.details() or "")


async def test_a_create_whose_node_goes_silent_is_kept_for_the_reconciler(
    fast_reconnect: None, cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node made the environment, then fell silent before answering: the record is
    kept `creating` (no orphan), and the reconciler keeps it once the node is back."""
    provider = cluster.provider("node1")
    made = provider._create
    answer = asyncio.Event()

    async def create_then_fall_silent(spec: EnvironmentSpec) -> EnvironmentStatus:
        status = await made(spec)
        cluster.transport("node1").silent = True
        await answer.wait()
        return status

    monkeypatch.setattr(provider, "_create", create_then_fall_silent)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(
                cluster.stub.CreateWorkspace(pb.CreateWorkspaceRequest(name="c1", node="node1")),
                GRACE + 5,
            )
    finally:
        answer.set()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    said = info.value.details() or ""
    assert "node 'node1' stopped answering during `create`" in said, said
    assert "reconciler keeps it" in said, said
    ws = await cluster.stub.GetWorkspace(pb.GetWorkspaceRequest(name="c1"))
    assert ws.state == pb.WORKSPACE_STATE_CREATING
    cluster.transport("node1").silent = False

    async def stopped() -> bool:
        ws = await cluster.stub.GetWorkspace(pb.GetWorkspaceRequest(name="c1"))
        return bool(ws.state == pb.WORKSPACE_STATE_STOPPED)

    await wait_until(stopped, "c1 kept by the reconciler", timeout=10)
    assert list(provider.environments) == ["c1"]


def test_the_cli_says_start_the_coordinator_only_when_it_cannot_reach_it() -> None:
    """Defect 5a: any UNAVAILABLE used to be "the coordinator is not running"."""
    # The coordinator's own word about a node, whose text mentions a refused connection.
    node = runner._error(
        rpc_error(
            grpc.StatusCode.UNAVAILABLE,
            "cannot reach node 'n1' (root@10.0.0.5:22): Connection refused; check that the "
            "node is up",
            (("vendetta-error", "NodeUnreachableError"),),
        )
    )
    assert isinstance(node, e.NodeUnreachableError)
    assert "n1" in str(node) and "server start" not in str(node)
    # A plain UnavailableError of the coordinator is tagged too.
    plain = runner._error(
        rpc_error(
            grpc.StatusCode.UNAVAILABLE,
            "failed to connect to the engine",
            (("vendetta-error", "UnavailableError"),),
        )
    )
    assert "server start" not in str(plain)
    # gRPC could not reach the socket: the coordinator is not running.
    down = runner._error(
        rpc_error(
            grpc.StatusCode.UNAVAILABLE,
            "failed to connect to all addresses; last error: UNAVAILABLE: unix:/x/c.sock: "
            "Connection refused",
        )
    )
    assert "vendetta server start" in str(down)
    # It was reached, then stopped answering (keepalive): not "not running".
    wedged = runner._error(rpc_error(grpc.StatusCode.UNAVAILABLE, "Stream removed (ping timeout)"))
    assert "stopped answering" in str(wedged) and "ping timeout" in str(wedged)


class _SlowHeartbeat(nodeagent_pb2_grpc.NodeAgentServicer):
    async def Heartbeat(
        self, request: nodeagent_pb2.HeartbeatRequest, context: object
    ) -> nodeagent_pb2.HeartbeatResponse:
        await asyncio.sleep(3600)
        return nodeagent_pb2.HeartbeatResponse()


async def test_a_heartbeat_on_a_channel_closed_under_it_is_an_error_not_a_cancellation() -> None:
    """Supervision catches VendettaErrors: a bare CancelledError (the channel closed by
    `node upgrade`'s reconnect during a heartbeat) would have ended it for good."""
    root = short_tmp_dir()
    path = str(root / "n.sock")
    server = grpc.aio.server()
    nodeagent_pb2_grpc.add_NodeAgentServicer_to_server(_SlowHeartbeat(), server)  # type: ignore[abstract]
    server.add_insecure_port(f"unix:{path}")
    await server.start()
    channel = grpc.aio.insecure_channel(f"unix:{path}", options=CHANNEL_OPTIONS)
    try:
        beat = asyncio.create_task(AgentClient(channel, "n1").heartbeat(timeout=60))
        await asyncio.sleep(0.3)
        await channel.close(None)
        with pytest.raises(e.VendettaError):
            await asyncio.wait_for(beat, 5)
    finally:
        await server.stop(None)
        shutil.rmtree(root, ignore_errors=True)


class _Stuck(coordinator_pb2_grpc.CoordinatorServicer):
    """A coordinator whose process answers (pings too) but whose work never ends."""

    async def ListWorkspaces(
        self, request: pb.ListWorkspacesRequest, context: object
    ) -> pb.ListWorkspacesResponse:
        await asyncio.sleep(3600)
        return pb.ListWorkspacesResponse()

    async def UpWorkspace(self, request: pb.WorkspaceRequest, context: object) -> pb.Workspace:
        await asyncio.sleep(3600)
        return pb.Workspace()


async def test_quick_cli_calls_have_a_deadline_long_ones_do_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = short_tmp_dir()
    monkeypatch.setenv("VENDETTA_HOME", str(root))
    monkeypatch.setitem(client.QUICK_CALLS, "ListWorkspaces", 0.5)
    server = grpc.aio.server()
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(_Stuck(), server)  # type: ignore[abstract]
    server.add_insecure_port(f"unix:{root / 'coordinator.sock'}")
    await server.start()
    try:
        async with client.coordinator() as c:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await c.ListWorkspaces(pb.ListWorkspacesRequest())
            said = str(runner._error(info.value))
            assert "the coordinator stopped answering" in said and "not running" not in said
            up = asyncio.ensure_future(c.UpWorkspace(pb.WorkspaceRequest(name="w")))
            done, _ = await asyncio.wait({up}, timeout=1.5)
            assert not done  # an `up` takes what its work takes (keepalive guards it)
            up.cancel()
    finally:
        await server.stop(None)
        shutil.rmtree(root, ignore_errors=True)
