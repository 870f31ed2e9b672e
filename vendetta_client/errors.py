"""The exception tree of vendetta, as the CLI has it (common/errors.py), for programs
that use the client package: a failed call raises one of these, mapped from its status
code (and the server's tag naming the exact kind), with the server's message.

    VendettaError
    ├── InvalidArgumentError        INVALID_ARGUMENT
    │   └── ConfigError             INVALID_ARGUMENT   .vendetta/config.yaml is wrong
    ├── NotFoundError               NOT_FOUND
    │   └── ImageNotFoundError      NOT_FOUND
    ├── AlreadyExistsError          ALREADY_EXISTS
    ├── FailedPreconditionError     FAILED_PRECONDITION
    │   ├── HostKeyMismatchError    FAILED_PRECONDITION
    │   └── NotRunningError         FAILED_PRECONDITION
    ├── PermissionDeniedError       PERMISSION_DENIED  the token's scope is too narrow
    │   └── UnauthenticatedError    UNAUTHENTICATED    no token, or a bad one (client only)
    ├── UnavailableError            UNAVAILABLE        the coordinator or a node not answering
    │   ├── NodeUnreachableError    UNAVAILABLE
    │   └── EngineUnavailableError  UNAVAILABLE
    ├── DeadlineExceededError       DEADLINE_EXCEEDED
    └── InternalError               INTERNAL           a bug: report it

A copy, since this package imports nothing of vendetta's own code; a test in the
repository holds it to common/errors.py.
"""

from __future__ import annotations

from typing import Any

import grpc


class VendettaError(Exception):
    """Base of every error a call raises; ``message`` says what to do."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code

    def __str__(self) -> str:
        return self.message


class InvalidArgumentError(VendettaError):
    pass


class ConfigError(InvalidArgumentError):
    pass


class NotFoundError(VendettaError):
    pass


class ImageNotFoundError(NotFoundError):
    pass


class AlreadyExistsError(VendettaError):
    pass


class FailedPreconditionError(VendettaError):
    pass


class HostKeyMismatchError(FailedPreconditionError):
    pass


class NotRunningError(FailedPreconditionError):
    pass


class PermissionDeniedError(VendettaError):
    pass


class UnauthenticatedError(PermissionDeniedError):
    pass


class UnavailableError(VendettaError):
    pass


class NodeUnreachableError(UnavailableError):
    pass


class EngineUnavailableError(UnavailableError):
    pass


class DeadlineExceededError(VendettaError):
    pass


class InternalError(VendettaError):
    pass


FROM_CODE: dict[grpc.StatusCode, type[VendettaError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.INTERNAL: InternalError,
}

# The server tags every error it sends with its class's name in this trailing key.
KIND_KEY = "vendetta-error"
KINDS: dict[str, type[VendettaError]] = {
    cls.__name__: cls
    for cls in (
        ConfigError,
        ImageNotFoundError,
        HostKeyMismatchError,
        NotRunningError,
        NodeUnreachableError,
        EngineUnavailableError,
    )
}


def _metadata(exc: grpc.RpcError) -> Any:
    trailing = getattr(exc, "trailing_metadata", None)
    return (trailing() if callable(trailing) else None) or ()


def from_server(exc: grpc.RpcError) -> bool:
    """Whether the coordinator sent the failure, as opposed to gRPC itself (no
    connection, a deadline, a cancelled call): only the latter may be retried blindly."""
    return any(key == KIND_KEY for key, _ in _metadata(exc))


def from_rpc_error(exc: grpc.RpcError) -> VendettaError:
    """The error tree for a failed call, keeping the server's message."""
    code: grpc.StatusCode = exc.code()
    details: str = exc.details() or ""
    message = details or code.name.lower()
    for key, value in _metadata(exc):
        if key == KIND_KEY and isinstance(value, str) and value in KINDS:
            return KINDS[value](message, code)
    if code == grpc.StatusCode.UNAVAILABLE and not from_server(exc):
        message = f"the coordinator does not answer: {details or 'no details'}"
    if code == grpc.StatusCode.CANCELLED:
        return UnavailableError(f"the call was cancelled: {message}", code)
    return FROM_CODE.get(code, InternalError)(message, code)
