"""RPC latency (issue 7 item 2): a unary call through the SSH tunnel, versus the
same call on the agent's own socket, versus a plain gRPC echo on loopback, and a
coordinator read (GetWorkspace) through its unix socket."""

from __future__ import annotations

from typing import Any

import grpc
import grpc.aio

from bench.cluster import IMAGE, Cluster
from bench.stats import Series, interleaved, row
from vendetta.v1 import coordinator_pb2 as pb
from vendetta.v1 import nodeagent_pb2, nodeagent_pb2_grpc


def _echo_server() -> grpc.aio.Server:
    async def ping(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo",
        {"Ping": grpc.unary_unary_rpc_method_handler(ping)},
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    return server


async def run(cl: Cluster, quick: bool) -> list[dict[str, Any]]:
    rounds = 300 if quick else 3000
    c = cl.stub
    node = cl.nodes["n1"]
    config = f"name: bench-rpc\ndocker: {{image: '{IMAGE}'}}\n"
    await c.CreateWorkspace(
        pb.CreateWorkspaceRequest(name="bench-rpc", node="n1", config_yaml=config)
    )
    echo = _echo_server()
    port = echo.add_insecure_port("127.0.0.1:0")
    await echo.start()
    tunnel = grpc.aio.insecure_channel(f"unix:{cl.tunnel_socket('n1')}")
    direct = grpc.aio.insecure_channel(f"unix:{node.agent_dir / 'agent.sock'}")
    loop_ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        ping = loop_ch.unary_unary("/bench.Echo/Ping", None, None)
        via_tunnel = nodeagent_pb2_grpc.NodeAgentStub(tunnel)
        via_socket = nodeagent_pb2_grpc.NodeAgentStub(direct)
        hb = nodeagent_pb2.HeartbeatRequest()
        get = pb.GetWorkspaceRequest(name="bench-rpc")
        s_echo, s_direct, s_tunnel, s_coord = (
            Series("plain gRPC echo, loopback TCP"),
            Series("agent Heartbeat, agent's unix socket"),
            Series("agent Heartbeat, through the SSH tunnel"),
            Series("coordinator GetWorkspace, unix socket"),
        )
        cases = [
            (s_echo, lambda: ping(b"x")),
            (s_direct, lambda: via_socket.Heartbeat(hb)),
            (s_tunnel, lambda: via_tunnel.Heartbeat(hb)),
            (s_coord, lambda: c.GetWorkspace(get)),
        ]
        await interleaved(50, [(Series("warm-up"), f) for _, f in cases])
        await interleaved(rounds, cases)  # type: ignore[arg-type]
        return [
            row(s_echo),
            row(s_direct, s_echo),
            row(s_tunnel, s_direct),
            row(s_coord, s_echo),
        ]
    finally:
        for ch in (tunnel, direct, loop_ch):
            await ch.close(None)
        await echo.stop(None)
        await c.DestroyWorkspace(pb.WorkspaceRequest(name="bench-rpc", force=True))
