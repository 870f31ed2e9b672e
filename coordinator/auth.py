"""Bearer tokens on the TLS listener: a gRPC server interceptor.

Each call's ``authorization: Bearer vdt_...`` is checked against the token
store (UNAUTHENTICATED: none, unknown, expired, revoked), then the method's
rule in coordinator/scopes.py (PERMISSION_DENIED: a narrower scope). An operate
token limited to some workspaces is held to them by looking at the request
itself: the handler is wrapped, so a unary request is checked before the
servicer runs and a streamed one at its first message. The token's record is in
:data:`caller` while the servicer runs (who did it, for events and audit).

The unix socket has no interceptor of this kind: its owner is the user.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from common.errors import PermissionDeniedError
from coordinator.scopes import OPEN, Rule, rule_for
from coordinator.tokens import TokenRecord, TokenService, UnauthenticatedError

log = logging.getLogger("vendetta.auth")

Ctx = grpc.aio.ServicerContext[Any, Any]

# The token behind the current call; None on the unix socket.
caller: contextvars.ContextVar[TokenRecord | None] = contextvars.ContextVar(
    "vendetta_caller", default=None
)


def bearer(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            kind, _, token = value.strip().partition(" ")
            return token.strip() if kind.lower() == "bearer" else ""
    return ""


def _field(message: Any, path: str) -> str:
    for part in path.split("."):
        message = getattr(message, part, "")
    return message if isinstance(message, str) else ""


def check_call(record: TokenRecord, rule: Rule, method: str) -> None:
    if not record.grants(rule.scope):
        raise PermissionDeniedError(
            f"token {record.name!r} has scope {', '.join(record.scopes)}; "
            f"{method.rsplit('/', 1)[-1]} needs {rule.scope}: ask the coordinator's owner for "
            f"a token with --scope {rule.scope}"
        )


def check_workspace(record: TokenRecord, name: str) -> None:
    """An operate token limited to some workspaces acts on those only."""
    if record.workspaces and not record.grants("admin") and name not in record.workspaces:
        raise PermissionDeniedError(
            f"token {record.name!r} may operate only on workspace(s) "
            f"{', '.join(record.workspaces)}, not {name[:63]!r}"
        )


def check_request(record: TokenRecord, rule: Rule, method: str, request: Any) -> None:
    """What a call asks for, beyond its method: the workspace it names, and nothing
    on the coordinator's own disk."""
    if rule.workspace:
        check_workspace(record, _field(request, rule.workspace))
    source = getattr(request, "source", "") if method.endswith("/CreateWorkspace") else ""
    if not source:
        return
    # A folder (or a file:// or ssh URL) would be read with the coordinator owner's rights
    # and keys on the coordinator's machine; even an https:// clone uses its network and
    # git credentials, so only admin (the owner's equal) may ask for one.
    if not source.startswith("https://"):
        raise PermissionDeniedError(
            "over the network a workspace's source can only be an https:// git URL, not a "
            "folder or another URL on the coordinator's machine: give --no-source (and "
            "clone inside), or --source https://... with an admin token"
        )
    if not record.grants("admin"):
        raise PermissionDeniedError(
            f"token {record.name!r} cannot have the coordinator fetch a source (it would "
            "use the coordinator machine's network and git credentials): give --no-source "
            "and clone inside the workspace, or ask for an admin token"
        )


async def authorize(
    tokens: TokenService, token: str, scope: str, what: str, workspace: str = ""
) -> TokenRecord:
    """The same checks for another front door (e.g. MCP over HTTP): the token's record
    if it may do ``what`` with ``scope`` (on ``workspace``, for operate), else
    UnauthenticatedError or PermissionDeniedError saying why."""
    if not token:
        raise UnauthenticatedError("no token: send `authorization: Bearer TOKEN`")
    record = await tokens.authenticate(token)
    check_call(record, Rule(scope), what)
    if scope == "operate":
        check_workspace(record, workspace)
    return record


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self, tokens: TokenService) -> None:
        self.tokens = tokens

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        method: str = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or method in OPEN:
            return handler
        token = bearer(handler_call_details.invocation_metadata)
        rule = rule_for(method)
        try:
            if rule is None:
                raise PermissionDeniedError(f"{method[:100]} is not served on the TLS listener")
            if not token:
                raise UnauthenticatedError(
                    "no token: this coordinator's TLS listener needs `authorization: Bearer "
                    "TOKEN` (the CLI: VENDETTA_TOKEN; the owner makes one with `vendetta token "
                    "create`)"
                )
            record = await self.tokens.authenticate(token)
            check_call(record, rule, method)
        except (UnauthenticatedError, PermissionDeniedError) as exc:
            unauthenticated = isinstance(exc, UnauthenticatedError)
            log.info("refused %s: %s", method[:100], exc.message)
            code = (
                grpc.StatusCode.UNAUTHENTICATED
                if unauthenticated
                else grpc.StatusCode.PERMISSION_DENIED
            )
            return _wrap(handler, _refuse(code, exc.message))
        return _wrap(handler, _guard(record, rule, method))


Guard = Callable[[Any, Ctx, Callable[..., Any], bool], Any]


def _refuse(code: grpc.StatusCode, message: str) -> Guard:
    def guard(request: Any, context: Ctx, fn: Callable[..., Any], streamed: bool) -> Any:
        async def refused() -> Any:
            await context.abort(code, message)

        async def refused_stream() -> AsyncIterator[Any]:
            await context.abort(code, message)
            yield  # pragma: no cover - abort raises

        return refused_stream() if streamed else refused()

    return guard


def _guard(record: TokenRecord, rule: Rule, method: str) -> Guard:
    def guard(request: Any, context: Ctx, fn: Callable[..., Any], streamed: bool) -> Any:
        if hasattr(request, "__aiter__"):  # a streamed request: check its first message
            request = _checked_stream(request, record, rule, method)

        async def unary() -> Any:
            caller.set(record)
            if not hasattr(request, "__aiter__"):
                check_request(record, rule, method, request)
            return await fn(request, context)

        async def stream() -> AsyncIterator[Any]:
            caller.set(record)
            if not hasattr(request, "__aiter__"):
                check_request(record, rule, method, request)
            async for item in fn(request, context):
                yield item

        return stream() if streamed else unary()

    return guard


async def _checked_stream(
    requests: AsyncIterator[Any], record: TokenRecord, rule: Rule, method: str
) -> AsyncIterator[Any]:
    first = True
    async for message in requests:
        if first:
            check_request(record, rule, method, message)
            first = False
        yield message


def _wrap(handler: Any, guard: Guard) -> Any:
    """The same kind of handler, with ``guard`` between gRPC and the servicer."""
    kinds = (
        (handler.unary_unary, grpc.unary_unary_rpc_method_handler, False),
        (handler.unary_stream, grpc.unary_stream_rpc_method_handler, True),
        (handler.stream_unary, grpc.stream_unary_rpc_method_handler, False),
        (handler.stream_stream, grpc.stream_stream_rpc_method_handler, True),
    )
    for fn, make, streamed in kinds:
        if fn is not None:

            def call(request: Any, context: Ctx, fn: Any = fn, streamed: bool = streamed) -> Any:
                return guard(request, context, fn, streamed)

            return make(
                call,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler
