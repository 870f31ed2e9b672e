"""DialRoute on the coordinator's unix socket (coordinator/dial.py): the node's
way to its agent's dial socket, with the workspace's provider filled in; refusals
that send ssh-proxy to Dial. Over TLS it is refused (tests/e2e/test_remote_api.py)."""

from __future__ import annotations

import grpc
import pytest

from tests.support.fakes import Cluster
from vendetta.v1 import common_pb2
from vendetta.v1 import coordinator_pb2 as pb


async def test_a_running_workspace_is_routed_to_its_agents_dial_socket(cluster: Cluster) -> None:
    await cluster.stub.CreateWorkspace(pb.CreateWorkspaceRequest(name="ws1", node="node1"))
    start = common_pb2.DialStart(workspace="ws1", host="127.0.0.1", port=8080)
    with pytest.raises(grpc.aio.AioRpcError) as stopped:
        await cluster.stub.DialRoute(start)
    assert stopped.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "vendetta workspace up ws1" in (stopped.value.details() or "")

    await cluster.stub.UpWorkspace(pb.WorkspaceRequest(name="ws1"))
    reply = await cluster.stub.DialRoute(start)
    agent = cluster.agents["node1"].server
    assert reply.socket == str(agent.socket.with_name("dial.sock"))
    assert (reply.start.workspace, reply.start.provider) == ("ws1", "docker")
    assert (reply.start.host, reply.start.port) == ("127.0.0.1", 8080)


async def test_no_dial_socket_sends_the_client_to_dial(cluster: Cluster) -> None:
    await cluster.stub.CreateWorkspace(pb.CreateWorkspaceRequest(name="ws1", node="node1"))
    await cluster.stub.UpWorkspace(pb.WorkspaceRequest(name="ws1"))
    cluster.agents["node1"].server.socket.with_name("dial.sock").unlink()  # an older agent
    start = common_pb2.DialStart(workspace="ws1", host="127.0.0.1", port=8080)
    with pytest.raises(grpc.aio.AioRpcError) as none:
        await cluster.stub.DialRoute(start)
    assert none.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "use Dial" in (none.value.details() or "")
