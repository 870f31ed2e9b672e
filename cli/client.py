"""Connecting to the coordinator, with its errors in the project's tree."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import grpc.aio

from common import keepalive
from common.errors import UnavailableError, VendettaError
from common.paths import coordinator_socket, vendetta_home
from common.rpc_errors import from_rpc_error, from_server
from vendetta.v1 import coordinator_pb2_grpc

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    *keepalive.CLIENT_OPTIONS,
]


def request_id() -> str:
    return uuid.uuid4().hex


def not_running() -> UnavailableError:
    return UnavailableError(
        f"the coordinator is not running (no answer at {coordinator_socket(vendetta_home())}): "
        "start it with `vendetta server start`"
    )


def not_answering(details: str) -> UnavailableError:
    return UnavailableError(
        f"the coordinator stopped answering ({details}); check it with `vendetta server "
        "status`, and if it stays so restart it: `vendetta server stop`, then "
        "`vendetta server start`"
    )


# How gRPC says it could not open a connection to the socket at all.
_NO_CONNECTION = ("failed to connect", "Connection refused", "No such file or directory")


def error_of(exc: grpc.aio.AioRpcError) -> VendettaError:
    """The error tree for a failed call to the coordinator. Only a failure to reach its
    socket means it is not running; what the coordinator itself says (a node that is
    unreachable, say) is its own error, with its own advice."""
    if exc.code() == grpc.StatusCode.UNAVAILABLE and not from_server(exc):
        details = exc.details() or ""
        if any(marker in details for marker in _NO_CONNECTION):
            return not_running()
        return not_answering(details or "no details")
    return from_rpc_error(exc)


@asynccontextmanager
async def coordinator() -> AsyncIterator[coordinator_pb2_grpc.CoordinatorAsyncStub]:
    sock = coordinator_socket(vendetta_home())
    if not sock.exists():
        raise not_running()
    async with grpc.aio.insecure_channel(f"unix:{sock}", options=CHANNEL_OPTIONS) as channel:
        yield coordinator_pb2_grpc.CoordinatorStub(channel)
