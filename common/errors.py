"""The one exception tree of vendetta.

Every component raises these; each boundary maps them at one seam:
providers map their SDK errors into it, ``common.rpc_errors`` maps it to gRPC
status codes on servers and back on clients, and the CLI turns it into one
line and an exit code. Messages say what went wrong *and what to do*.

    VendettaError
    ├── InvalidArgumentError        INVALID_ARGUMENT   bad names, bad config, bad flags
    │   └── ConfigError             INVALID_ARGUMENT   .vendetta/config.yaml is wrong
    ├── NotFoundError               NOT_FOUND          unknown node, workspace, environment
    │   └── ImageNotFoundError      NOT_FOUND          the image is not on the node
    ├── AlreadyExistsError          ALREADY_EXISTS     name taken
    ├── FailedPreconditionError     FAILED_PRECONDITION  wrong state for the operation
    │   ├── HostKeyMismatchError    FAILED_PRECONDITION  pinned SSH host key changed
    │   └── NotRunningError         FAILED_PRECONDITION  the environment is not running
    ├── PermissionDeniedError       PERMISSION_DENIED  SSH auth refused
    ├── UnavailableError            UNAVAILABLE        something we need is not answering
    │   ├── NodeUnreachableError    UNAVAILABLE        SSH or agent cannot be reached
    │   └── EngineUnavailableError  UNAVAILABLE        Docker/LXD/libvirt daemon down or missing
    ├── DeadlineExceededError       DEADLINE_EXCEEDED
    └── InternalError               INTERNAL           a bug: report it
"""

from __future__ import annotations


class VendettaError(Exception):
    """Base of every error vendetta raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

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
    """The workspace's environment exists but is not running (or stopped meanwhile)."""


class PermissionDeniedError(VendettaError):
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
