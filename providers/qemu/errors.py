"""The qemu provider's one error seam: ``libvirt.libvirtError`` into ``common.errors``.

Every libvirt call in this package runs inside :func:`libvirt_errors` (or its
exception goes through :func:`translate`), so no ``libvirtError`` leaves the
provider. By ``get_error_code()``, most specific first:

    VIR_ERR_NO_DOMAIN                          -> NotFoundError
    VIR_ERR_DOM_EXIST, "already exists"        -> AlreadyExistsError
    VIR_ERR_NO_CONNECT, VIR_ERR_RPC,
      "failed to connect", "cannot connect"    -> EngineUnavailableError (how to start libvirtd)
    VIR_ERR_AUTH_*, VIR_ERR_ACCESS_DENIED      -> PermissionDeniedError (the libvirt group)
    "cannot allocate memory", "out of memory"  -> FailedPreconditionError (lower the memory)
    VIR_ERR_AGENT_UNRESPONSIVE/UNSYNCED        -> UnavailableError (the guest agent)
    VIR_ERR_OPERATION_TIMEOUT                  -> DeadlineExceededError
    VIR_ERR_OPERATION_INVALID, NO_SUPPORT,
      OPERATION_FAILED                         -> FailedPreconditionError
    VIR_ERR_INVALID_ARG, XML_ERROR,
      CONFIG_UNSUPPORTED                       -> InvalidArgumentError
    anything else                              -> InternalError
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import libvirt

from common.errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    EngineUnavailableError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnavailableError,
    VendettaError,
)

START_HINT = (
    "start it with `bash scripts/engine-qemu.sh` (starts virtlogd and libvirtd), "
    "`libvirtd -d` or `systemctl start libvirtd`"
)
IMAGE_HINT = "build it with `bash scripts/build-guest-image.sh`"

_CONNECTION_MARKERS = ("failed to connect", "cannot connect", "connection reset", "broken pipe")
_MEMORY_MARKERS = ("cannot allocate memory", "out of memory", "not enough memory")


def unreachable_message(uri: str, reason: str = "") -> str:
    message = f"libvirt daemon not reachable at {uri}: {START_HINT}"
    return f"{message} ({reason})" if reason else message


def _code(exc: libvirt.libvirtError) -> int:
    code = exc.get_error_code()
    return int(code) if code is not None else -1


def translate(exc: BaseException, *, uri: str, action: str) -> VendettaError:
    """The ``common.errors`` exception for ``exc``, raised while ``action``."""
    if isinstance(exc, VendettaError):
        return exc
    if not isinstance(exc, libvirt.libvirtError):
        if isinstance(exc, OSError):
            return EngineUnavailableError(f"{action}: {exc}")
        return InternalError(f"{action}: unexpected error: {exc!r}")
    code = _code(exc)
    text = (exc.get_error_message() or str(exc)).strip()
    lowered = text.lower()
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return NotFoundError(f"{action}: {text}")
    if code == libvirt.VIR_ERR_DOM_EXIST or "already exists" in lowered:
        return AlreadyExistsError(f"{action}: {text}")
    if code in (libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_RPC) or any(
        m in lowered for m in _CONNECTION_MARKERS
    ):
        if "permission denied" in lowered:
            return PermissionDeniedError(
                f"{action}: permission denied on the libvirt socket: run the agent as root or "
                "as a member of the `libvirt` group (see shared ENGINES.md) ({text})"
            )
        return EngineUnavailableError(unreachable_message(uri, text))
    if code in (
        libvirt.VIR_ERR_AUTH_FAILED,
        libvirt.VIR_ERR_AUTH_CANCELLED,
        libvirt.VIR_ERR_AUTH_UNAVAILABLE,
        libvirt.VIR_ERR_ACCESS_DENIED,
    ):
        return PermissionDeniedError(
            f"{action}: libvirt refused access at {uri}: run the agent as root or as a member "
            f"of the `libvirt` group ({text})"
        )
    if any(m in lowered for m in _MEMORY_MARKERS):
        return FailedPreconditionError(
            f"{action}: not enough memory on the node for this guest ({text}): lower the "
            "environment's memory or free memory on the node"
        )
    if code in (libvirt.VIR_ERR_AGENT_UNRESPONSIVE, libvirt.VIR_ERR_AGENT_UNSYNCED):
        return UnavailableError(
            f"{action}: the guest agent is not answering ({text}); the guest may still be "
            "booting or be hung: retry, or stop and start the workspace"
        )
    if code == libvirt.VIR_ERR_OPERATION_TIMEOUT:
        return DeadlineExceededError(f"{action}: libvirt timed out: {text}")
    if code in (
        libvirt.VIR_ERR_OPERATION_INVALID,
        libvirt.VIR_ERR_NO_SUPPORT,
        libvirt.VIR_ERR_OPERATION_FAILED,
        libvirt.VIR_ERR_OPERATION_UNSUPPORTED,
    ):
        return FailedPreconditionError(f"{action}: {text}")
    if code in (
        libvirt.VIR_ERR_INVALID_ARG,
        libvirt.VIR_ERR_XML_ERROR,
        libvirt.VIR_ERR_CONFIG_UNSUPPORTED,
    ):
        return InvalidArgumentError(f"{action}: {text}")
    return InternalError(f"{action}: unexpected libvirt error (code {code}): {text}")


@contextlib.contextmanager
def libvirt_errors(uri: str, action: str) -> Iterator[None]:
    """Re-raise libvirt errors from the block as ``common.errors``, chained."""
    try:
        yield
    except VendettaError:
        raise
    except libvirt.libvirtError as exc:
        raise translate(exc, uri=uri, action=action) from exc
