"""The way from `vendetta ssh-proxy` to the workspace's agent that skips gRPC:
when the coordinator runs on this machine, DialRoute names a local socket that
the node's tunnel forwards to the agent's dial socket (nodeagent/dial_socket.py).
A connection there carries one `ssh -L`/`-D` channel or one session's command
(scp, sftp, rsync, git) as plain bytes, the coordinator never reading them.
Where there is no route (a coordinator elsewhere, a node whose tunnel asyncssh
carries, an older agent), callers use the Dial and Connect streams."""

from __future__ import annotations

import asyncio
import socket
from contextlib import AsyncExitStack
from typing import Any

import grpc

from cli import remote
from cli.client import coordinator
from common.dial_wire import HandshakeError, encode, read_line
from vendetta.v1 import common_pb2, coordinator_pb2_grpc


class Link:
    """One gRPC channel to the coordinator for all of a connection's channels,
    opened at the first need (a coordinator that is down fails that channel)."""

    def __init__(self, stub: coordinator_pb2_grpc.CoordinatorAsyncStub | None = None) -> None:
        self._stack = AsyncExitStack()
        self._stub = stub
        self._lock = asyncio.Lock()
        # DialRoute is worth asking only of a coordinator on this machine.
        self.routes = remote.target() is None

    async def stub(self) -> coordinator_pb2_grpc.CoordinatorAsyncStub:
        async with self._lock:
            if self._stub is None:
                self._stub = await self._stack.enter_async_context(coordinator())
            return self._stub

    async def close(self) -> None:
        await self._stack.aclose()


class Routed:
    """A connection to the agent's dial socket after the handshake: its answer, the
    bytes that followed the answer, and the socket (non-blocking; the caller's);
    and where a redirect goes (DialRouteReply's control, local)."""

    def __init__(
        self, sock: socket.socket, answer: dict[str, Any], rest: bytes, reply: Any
    ) -> None:
        self.sock = sock
        self.answer = answer
        self.rest = rest
        self.control: str = reply.control
        self.local: bool = reply.local

    @property
    def error(self) -> str:
        return str(self.answer.get("error") or "")


async def open_route(
    link: Link, start: common_pb2.DialStart, *, redirect: bool = False, **request: Any
) -> Routed | None:
    """A connection through the agent's dial socket for ``start.workspace`` with the
    handshake sent (the target of ``start``, or ``request``'s command) and answered;
    None where there is no route, or it is down (the tunnel reconnecting).
    ``redirect``: the agent may answer where to connect instead, when this side
    can reach it (cli/tunnel_master.py)."""
    if not link.routes:
        return None
    try:
        reply = await (await link.stub()).DialRoute(start)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED:  # an older coordinator
            link.routes = False
        return None  # the stream's call says what is wrong, if anything is
    except Exception:
        return None
    hello: dict[str, Any] = {"workspace": reply.start.workspace, "provider": reply.start.provider}
    if request:
        hello.update(request)
    else:
        hello.update(host=reply.start.host, port=reply.start.port)
        if redirect and (reply.control or reply.local):
            hello["redirect"] = True
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    try:
        await loop.sock_connect(sock, reply.socket)
        await loop.sock_sendall(sock, encode(hello))
        answer, rest = await read_line(sock)
    except (OSError, HandshakeError):
        sock.close()
        return None
    return Routed(sock, answer, rest, reply)
