"""The Coordinator's token RPCs (`vendetta token`) and what ServerInfo says of the TLS
listener, on top of the servicer of coordinator/servicer.py."""

from __future__ import annotations

import logging
from typing import Any

import grpc.aio

from coordinator.auth import caller
from coordinator.servicer import CoordinatorServicer
from coordinator.tokens import TokenRecord, TokenService
from vendetta.v1 import coordinator_pb2 as pb

Ctx = grpc.aio.ServicerContext[Any, Any]
log = logging.getLogger("vendetta.events")
EVENT_MAX = 500


def token_to_pb(t: TokenRecord) -> pb.Token:
    return pb.Token(
        id=t.id,
        name=t.name,
        scopes=t.scopes,
        workspaces=t.workspaces,
        created_unix_nano=t.created_unix_nano,
        expires_unix_nano=t.expires_unix_nano,
        revoked_unix_nano=t.revoked_unix_nano,
        created_by=t.created_by,
    )


class ApiServicer(CoordinatorServicer):
    """The servicer both listeners serve: the socket's and the TLS one's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tokens = TokenService(self.store)
        self.listen = ""  # the TLS listener's address and fingerprint, once it listens
        self.tls_fingerprint = ""

    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context: Ctx) -> pb.ServerInfo:
        info = await super().GetServerInfo(request, context)
        info.listen, info.tls_fingerprint = self.listen, self.tls_fingerprint
        return info

    async def CreateToken(
        self, request: pb.CreateTokenRequest, context: Ctx
    ) -> pb.CreateTokenResponse:
        who = caller.get()
        record, secret = await self.tokens.create(
            request.name,
            list(request.scopes),
            list(request.workspaces),
            request.expires_seconds,
            created_by=f"token {who.name}" if who else "socket",
        )
        return pb.CreateTokenResponse(token=token_to_pb(record), secret=secret)

    async def ListTokens(
        self, request: pb.ListTokensRequest, context: Ctx
    ) -> pb.ListTokensResponse:
        return pb.ListTokensResponse(tokens=[token_to_pb(t) for t in await self.tokens.list()])

    async def RevokeToken(self, request: pb.RevokeTokenRequest, context: Ctx) -> pb.Token:
        return token_to_pb(await self.tokens.revoke(request.token))

    async def RecordWorkspaceEvent(
        self, request: pb.RecordWorkspaceEventRequest, context: Ctx
    ) -> pb.RecordWorkspaceEventResponse:
        ws = await self.workspaces.get(request.name)
        token = caller.get()
        who = f"token {token.name}" if token else "the local user"
        # One printable line, bounded: shown by `workspace status --watch` and in the log.
        what = " ".join(request.message.split())[:EVENT_MAX]
        source = " ".join(request.source.split())[:40] or "api"
        self.workspaces.publish(ws, f"{source}: {who}: {what}")
        log.info("workspace %s: %s: %s: %s", ws.name, source, who, what)
        return pb.RecordWorkspaceEventResponse(who=who)
