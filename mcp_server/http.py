"""MCP over streamable HTTP behind TLS: the coordinator's certificate and key (or the
user's), and a bearer token of the coordinator's on every request. A request without a
token the coordinator accepts gets 401 before MCP sees it; each tool call then goes to
the coordinator's TLS listener with the caller's own token, so its scope is the
coordinator's decision (and its name is what the workspace's events record)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import uvicorn
from mcp.server.transport_security import TransportSecuritySettings

from common.errors import InvalidArgumentError, UnavailableError
from common.remote import Target
from mcp_server.backend import TokenBackend
from mcp_server.tools import build
from vendetta.v1 import coordinator_pb2 as pb

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]
ACCEPTED_FOR = 30.0  # seconds a token the coordinator accepted is not asked again


def coordinator_target(info: pb.ServerInfo) -> Target:
    """This machine's way to the coordinator's TLS listener (ServerInfo.listen)."""
    if not info.listen:
        raise UnavailableError(
            "the coordinator has no TLS listener: start it with `vendetta server start "
            "--listen HOST:PORT` (MCP over HTTP uses its tokens and certificate)"
        )
    host, _, port = info.listen.rpartition(":")
    host = host.strip("[]")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return Target(host, int(port))


class BearerGate:
    """ASGI: 401 for a request whose bearer token the coordinator does not accept."""

    def __init__(self, app: App, backend: TokenBackend) -> None:
        self.app, self.backend = app, backend
        self._accepted: dict[str, float] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or ()).get(b"authorization", b"").decode("latin-1")
        kind, _, token = header.strip().partition(" ")
        token = token.strip() if kind.lower() == "bearer" else ""
        why = await self._refusal(token)
        if why is None:
            await self.app(scope, receive, send)
            return
        body = json.dumps({"error": why}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"www-authenticate", b'Bearer realm="vendetta"'),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _refusal(self, token: str) -> str | None:
        if not token:
            return "no token: send `Authorization: Bearer TOKEN` (vendetta token create)"
        if self._accepted.get(token, 0.0) > time.monotonic():
            return None
        stub = await self.backend.stub(token)
        try:
            await stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=15)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                await self.backend.forget(token)
                return exc.details() or "token refused"
            raise
        if len(self._accepted) > 1000:
            self._accepted.clear()
        self._accepted[token] = time.monotonic() + ACCEPTED_FOR
        return None


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise InvalidArgumentError(f"--http {text[:80]!r}: give HOST:PORT, e.g. 127.0.0.1:7444")
    return host, int(port)


async def serve(
    host: str, port: int, cert: Path, key: Path, backend: TokenBackend, ready: Callable[[int], None]
) -> None:
    # No DNS-rebinding check of Host: the bearer token is not ambient (a browser on a
    # rebound name does not have it), and the address may be any of this machine's.
    security = TransportSecuritySettings(enable_dns_rebinding_protection=False)
    app = BearerGate(build(backend, transport_security=security).streamable_http_app(), backend)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        ssl_certfile=str(cert),
        ssl_keyfile=str(key),
        log_level="warning",
        lifespan="on",
    )
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve())
    while not server.started and not task.done():  # noqa: ASYNC110  (uvicorn: a flag only)
        await asyncio.sleep(0.05)
    if server.started:  # port 0: the one the system chose
        ready(server.servers[0].sockets[0].getsockname()[1])
    await task
