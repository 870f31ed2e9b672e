"""The seam between the error tree and gRPC status codes, both directions.

Servers install :class:`ErrorMappingInterceptor`, so servicers just raise
``VendettaError``s; clients wrap calls in :func:`mapped_rpc_errors` (or call
:func:`from_rpc_error`) to get the same tree back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import grpc
import grpc.aio

from common import errors as e

log = logging.getLogger(__name__)

# Most specific first: the first isinstance match wins.
_TO_CODE: list[tuple[type[e.VendettaError], grpc.StatusCode]] = [
    (e.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (e.NotFoundError, grpc.StatusCode.NOT_FOUND),
    (e.AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (e.FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (e.PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (e.UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (e.DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (e.InternalError, grpc.StatusCode.INTERNAL),
]

_FROM_CODE: dict[grpc.StatusCode, type[e.VendettaError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: e.InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: e.NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: e.AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: e.FailedPreconditionError,
    grpc.StatusCode.PERMISSION_DENIED: e.PermissionDeniedError,
    grpc.StatusCode.UNAVAILABLE: e.UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: e.DeadlineExceededError,
    grpc.StatusCode.INTERNAL: e.InternalError,
}

# Subclasses whose identity matters to callers travel as a trailing metadata tag.
_KIND_KEY = "vendetta-error"
_KINDS: dict[str, type[e.VendettaError]] = {
    cls.__name__: cls
    for cls in (
        e.ConfigError,
        e.ImageNotFoundError,
        e.HostKeyMismatchError,
        e.NotRunningError,
        e.NodeUnreachableError,
        e.EngineUnavailableError,
    )
}


def status_code_for(exc: e.VendettaError) -> grpc.StatusCode:
    for cls, code in _TO_CODE:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.UNKNOWN


def from_server(exc: grpc.aio.AioRpcError) -> bool:
    """Whether a vendetta server raised the failure (its handlers tag every error they
    send), as opposed to gRPC itself: a connection that could not be made, broke,
    timed out or was cancelled."""
    metadata: Any = exc.trailing_metadata() or ()
    return any(key == _KIND_KEY for key, _ in metadata)


# gRPC's own failures of a call (never sent by our handlers, which tag theirs).
TRANSPORT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
    }
)

# How a caller names a failure of the connection itself: (status code, gRPC's details).
TransportFailure = Callable[[grpc.StatusCode, str], e.VendettaError]


def from_rpc_error(
    exc: grpc.aio.AioRpcError, transport: TransportFailure | None = None
) -> e.VendettaError:
    """Turn a failed call back into the error tree, keeping the server's message.

    With ``transport``, a failure gRPC made up itself (the peer unreachable or gone,
    a deadline) is what ``transport`` says instead: the caller knows who the peer is."""
    code = exc.code()
    message = exc.details() or code.name.lower()
    metadata: Any = exc.trailing_metadata() or ()
    for key, value in metadata:
        if key == _KIND_KEY and isinstance(value, str) and value in _KINDS:
            return _KINDS[value](message)
    if transport is not None and code in TRANSPORT_CODES and not from_server(exc):
        return transport(code, message)
    if code == grpc.StatusCode.UNAVAILABLE and not exc.details():
        message = "the server is not answering"
    if code == grpc.StatusCode.CANCELLED:
        return e.UnavailableError(f"the call was cancelled: {message}")
    return _FROM_CODE.get(code, e.InternalError)(message)


@contextmanager
def mapped_rpc_errors(transport: TransportFailure | None = None) -> Iterator[None]:
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc, transport) from exc


# A status is a line or two for a person. What a handler echoes of its input (a name, a
# host, a path) may be huge: over 16 KiB gRPC drops the status and the client gets
# RESOURCE_EXHAUSTED "metadata size exceeds hard limit" instead (found by fuzzing).
MAX_MESSAGE = 2000


def wire_message(message: str) -> str:
    """``message`` as it may travel: control and format characters (terminal escapes,
    right-to-left overrides) escaped, newlines and tabs kept; cut to MAX_MESSAGE."""
    if not message.isprintable():
        message = "".join(
            ch if ch.isprintable() or ch in "\n\t" else repr(ch)[1:-1] for ch in message
        )
    if len(message) > MAX_MESSAGE:
        return f"{message[:MAX_MESSAGE]}... ({len(message)} characters)"
    return message


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> None:
    if isinstance(exc, e.VendettaError):
        # Every error is tagged (clients tell it from gRPC's own failures); the kinds
        # in _KINDS are also rebuilt as such on the other side.
        context.set_trailing_metadata(((_KIND_KEY, type(exc).__name__),))
        await context.abort(status_code_for(exc), wire_message(exc.message))
    log.exception("unexpected error in RPC handler", exc_info=exc)
    await context.abort(
        grpc.StatusCode.INTERNAL, wire_message(f"internal error: {exc!r} (this is a bug)")
    )


_T = TypeVar("_T")


def _wrap_unary(
    fn: Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[_T]],
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[_T]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> _T:
        try:
            return await fn(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            if hasattr(request, "__aiter__"):  # client-streaming: see _drain
                await _drain(request)
            await _abort(context, exc)
            raise AssertionError("unreachable") from exc

    return wrapper


# How long a failed client-streaming call still reads what the client sends.
DRAIN_SECONDS = 2.0


async def _drain(requests: AsyncIterator[Any]) -> None:
    """Read (and drop) the rest of a client's stream before sending the error: a client
    still writing when the call ends gets grpc's own INTERNAL "Internal error from Core"
    instead of our status (grpc/aio/_call.py, _write). Bounded: a huge upload still races."""

    async def rest() -> None:
        async for _ in requests:
            pass

    with contextlib.suppress(Exception):
        await asyncio.wait_for(rest(), DRAIN_SECONDS)


def _wrap_stream(
    fn: Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[_T]],
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[_T]]:
    async def wrapper(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[_T]:
        try:
            async for item in fn(request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc)

    return wrapper


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Maps the error tree to status codes for unary, client-, server- and bidi-streaming
    RPCs."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(handler.stream_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                _wrap_stream(handler.stream_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
