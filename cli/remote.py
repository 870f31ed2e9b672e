"""The CLI against a coordinator on another machine: VENDETTA_URL, VENDETTA_TOKEN and
VENDETTA_TLS_FINGERPRINT (or VENDETTA_TLS_CA) instead of the local socket.

cli/client.py's ``coordinator()`` asks :func:`target` first; every command then
works as on the socket, with the token's scope (common/remote.py says how the
certificate is trusted). The token is sent only to the pinned or verified server
and never printed.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from common.errors import UnavailableError

if TYPE_CHECKING:  # common.remote brings ssl and hashlib: loaded only for a remote coordinator
    from common.remote import Target

URL_ENV = "VENDETTA_URL"
TOKEN_ENV = "VENDETTA_TOKEN"
FINGERPRINT_ENV = "VENDETTA_TLS_FINGERPRINT"
CA_ENV = "VENDETTA_TLS_CA"


def target() -> Target | None:
    """The remote coordinator the environment names; None: the local socket."""
    url = os.environ.get(URL_ENV, "").strip()
    if not url:
        return None
    from common.remote import parse_url

    return parse_url(url)


def not_reachable(where: Target) -> UnavailableError:
    return UnavailableError(
        f"the coordinator at {where} does not answer: check VENDETTA_URL, and that it runs "
        "there with `vendetta server start --listen HOST:PORT`"
    )


@asynccontextmanager
async def channel(where: Target, options: list[tuple[str, Any]]) -> AsyncIterator[grpc.aio.Channel]:
    from common.remote import channel_credentials

    ca = os.environ.get(CA_ENV, "")
    creds, extra = await channel_credentials(
        where, os.environ.get(FINGERPRINT_ENV, ""), Path(ca).expanduser() if ca else None
    )
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
    async with grpc.aio.secure_channel(where.address, creds, options=[*options, *extra]) as ch:
        yield ch
