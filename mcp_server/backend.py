"""How the MCP server reaches the coordinator: one channel for stdio (the local socket,
or VENDETTA_URL with VENDETTA_TOKEN), or one per caller's token for HTTP (to the
coordinator's TLS listener, pinned to its certificate), so every call carries the
token of whoever asked and the coordinator checks its scope."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Protocol

import grpc
import grpc.aio

from common import keepalive
from common.errors import PermissionDeniedError, UnavailableError
from common.paths import coordinator_socket, vendetta_home
from common.remote import Target, channel_credentials, parse_url
from vendetta.v1 import coordinator_pb2_grpc

if TYPE_CHECKING:  # the async stub is a type only (the .pyi's)
    Stub = coordinator_pb2_grpc.CoordinatorAsyncStub
OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    *keepalive.CLIENT_OPTIONS,
]
SCOPES = ("read", "operate", "admin")
MAX_CHANNELS = 64  # callers' tokens with a channel open at once (HTTP)


class Backend(Protocol):
    async def stub(self, token: str) -> Stub: ...

    def check(self, scope: str, workspace: str) -> None: ...

    async def close(self) -> None: ...


class LocalBackend:
    """stdio: the CLI's own way to the coordinator; ``scope`` and ``workspaces`` narrow
    what the agent may do (the socket itself grants everything)."""

    def __init__(self, scope: str = "operate", workspaces: tuple[str, ...] = ()) -> None:
        self.scope, self.workspaces = scope, workspaces
        self._channel: grpc.aio.Channel | None = None

    async def stub(self, token: str) -> Stub:
        if self._channel is None:
            self._channel = await self._open()
        return coordinator_pb2_grpc.CoordinatorStub(self._channel)

    async def _open(self) -> grpc.aio.Channel:
        url = os.environ.get("VENDETTA_URL", "").strip()
        if url:
            where = parse_url(url)
            creds, extra = await channel_credentials(
                where, os.environ.get("VENDETTA_TLS_FINGERPRINT", "")
            )
            token = os.environ.get("VENDETTA_TOKEN", "").strip()
            if token:
                creds = grpc.composite_channel_credentials(
                    creds, grpc.access_token_call_credentials(token)
                )
            return grpc.aio.secure_channel(where.address, creds, options=[*OPTIONS, *extra])
        sock = coordinator_socket(vendetta_home())
        if not sock.exists():
            raise UnavailableError(
                f"the coordinator is not running (no socket at {sock}): start it with "
                "`vendetta server start`"
            )
        return grpc.aio.insecure_channel(f"unix:{sock}", options=OPTIONS)

    def check(self, scope: str, workspace: str) -> None:
        if SCOPES.index(scope) > SCOPES.index(self.scope):
            raise PermissionDeniedError(
                f"this MCP server was started with --scope {self.scope}; this tool needs "
                f"{scope}: restart it with `vendetta mcp --scope {scope}`"
            )
        if workspace and self.workspaces and workspace not in self.workspaces:
            raise PermissionDeniedError(
                f"this MCP server may act only on workspace(s) {', '.join(self.workspaces)}, "
                f"not {workspace[:63]!r}"
            )

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(None)


class TokenBackend:
    """HTTP: each caller's token on a channel of its own to the coordinator's listener;
    the coordinator decides what the token may do."""

    def __init__(self, target: Target, fingerprint: str) -> None:
        self.target, self.fingerprint = target, fingerprint
        self._base: tuple[grpc.ChannelCredentials, list[tuple[str, Any]]] | None = None
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def stub(self, token: str) -> Stub:
        if not token:
            raise PermissionDeniedError("no token: send `Authorization: Bearer TOKEN`")
        if token not in self._channels:
            if len(self._channels) >= MAX_CHANNELS:  # the oldest goes (dicts keep order)
                await self.forget(next(iter(self._channels)))
            if self._base is None:
                self._base = await channel_credentials(self.target, self.fingerprint)
            creds, extra = self._base
            creds = grpc.composite_channel_credentials(
                creds, grpc.access_token_call_credentials(token)
            )
            self._channels[token] = grpc.aio.secure_channel(
                self.target.address, creds, options=[*OPTIONS, *extra]
            )
        return coordinator_pb2_grpc.CoordinatorStub(self._channels[token])

    def check(self, scope: str, workspace: str) -> None:
        """The coordinator checks each call's token itself."""

    async def forget(self, token: str) -> None:
        """Close the channel of a token (refused, or the oldest of too many)."""
        channel = self._channels.pop(token, None)
        if channel is not None:
            await channel.close(None)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close(None)
