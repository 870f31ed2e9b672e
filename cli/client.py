"""Connecting to the coordinator, with its errors in the project's tree."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from cli import remote
from common import keepalive
from common.errors import UnavailableError, VendettaError
from common.paths import coordinator_socket, vendetta_home
from common.rpc_errors import from_rpc_error, from_server
from vendetta.v1 import coordinator_pb2_grpc

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    *keepalive.CLIENT_OPTIONS,
]

# Seconds the coordinator has to answer the calls that only read (what it may ask a
# node is bounded by less); the ones that act (up, add, test, ...) take what their
# work takes and rely on the keepalive pings.
QUICK_CALLS = {
    "GetServerInfo": 30.0,
    "ListNodes": 30.0,
    "GetNode": 30.0,
    "ListWorkspaces": 30.0,
    "GetWorkspace": 30.0,
    "GetConnectionInfo": 30.0,
    "ScanHostKey": 60.0,
    "TrustNode": 60.0,
    "ListImages": 90.0,
}


if TYPE_CHECKING:
    _UnaryInterceptor = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
else:  # not subscriptable at run time
    _UnaryInterceptor = grpc.aio.UnaryUnaryClientInterceptor


class _Deadlines(_UnaryInterceptor):
    """A deadline for the quick calls that come without one: a coordinator whose
    process answers pings but whose work is stuck still ends them."""

    async def intercept_unary_unary(
        self, continuation: Callable[[Any, Any], Any], details: Any, request: Any
    ) -> Any:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        deadline = QUICK_CALLS.get(str(method).rsplit("/", 1)[-1])
        if details.timeout is None and deadline is not None:
            details = details._replace(timeout=deadline)
        return await continuation(details, request)


def request_id() -> str:
    return uuid.uuid4().hex


def not_running() -> UnavailableError:
    if (where := remote.target()) is not None:
        return remote.not_reachable(where)
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
    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and not from_server(exc):
        return not_answering("no answer in time")
    return from_rpc_error(exc)


@asynccontextmanager
async def coordinator() -> AsyncIterator[coordinator_pb2_grpc.CoordinatorAsyncStub]:
    if (where := remote.target()) is not None:  # VENDETTA_URL: over TLS with a token
        async with remote.channel(where, CHANNEL_OPTIONS) as channel:
            yield coordinator_pb2_grpc.CoordinatorStub(channel)
        return
    sock = coordinator_socket(vendetta_home())
    if not sock.exists():
        raise not_running()
    async with grpc.aio.insecure_channel(
        f"unix:{sock}",
        options=CHANNEL_OPTIONS,
        interceptors=[_Deadlines()],  # type: ignore[list-item]  # the stubs' placeholder type
    ) as channel:
        yield coordinator_pb2_grpc.CoordinatorStub(channel)
