"""The qemu provider's one error seam: ``libvirt.libvirtError`` into ``common.errors``.

Every libvirt call in this package runs inside :func:`libvirt_errors` (or its
exception goes through :func:`translate`), so no ``libvirtError`` leaves the
provider and nothing outside this module looks at an error's text. By
``get_error_code()`` and ``get_error_domain()``, most specific first; libvirt
gives some causes no code of their own, and only for those the message is read:

    VIR_ERR_NO_DOMAIN                          -> NotFoundError
    the agent's guest-exec of a missing
      program (INTERNAL_ERROR from QEMU)       -> NotFoundError
    VIR_ERR_DOM_EXIST, OPERATION_FAILED
      "already exists"                         -> AlreadyExistsError
    VIR_ERR_NO_CONNECT, VIR_ERR_RPC,
      SYSTEM_ERROR from RPC/REMOTE             -> EngineUnavailableError (how to start libvirtd),
                                                  PermissionDeniedError if the socket refused us
                                                  (names the socket, its group, the fix)
    "system bus", "polkit" (libvirtd wants
      polkit, which does not run)              -> PermissionDeniedError (libvirtd.conf settings)
    VIR_ERR_AUTH_*, VIR_ERR_ACCESS_DENIED      -> PermissionDeniedError (the libvirt group)
    "cannot allocate memory", "out of memory"  -> FailedPreconditionError (lower the memory)
    VIR_ERR_AGENT_UNRESPONSIVE/UNSYNCED        -> UnavailableError (the guest agent)
    VIR_ERR_OPERATION_TIMEOUT                  -> DeadlineExceededError
    VIR_ERR_OPERATION_INVALID, NO_SUPPORT,
      OPERATION_FAILED                         -> FailedPreconditionError
    VIR_ERR_INVALID_ARG, XML_ERROR,
      CONFIG_UNSUPPORTED                       -> InvalidArgumentError
    anything else                              -> InternalError

:func:`port_taken` tells a start that lost a node port to another program.
A call that needs a running guest fails with many codes once the guest has
stopped; :func:`guest_running` asks the guest instead and raises
``NotRunningError``.
"""

from __future__ import annotations

import contextlib
import re
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
    NotRunningError,
    PermissionDeniedError,
    UnavailableError,
    VendettaError,
)
from providers.access import permission_hint
from providers.errors import translated

START_HINT = (
    "start it with `bash scripts/engine-qemu.sh` (starts virtlogd and libvirtd), "
    "`libvirtd -d` or `systemctl start libvirtd`"
)
IMAGE_HINT = "build it with `bash scripts/build-guest-image.sh`"

DEFAULT_SOCKET = "/var/run/libvirt/libvirt-sock"
# Without polkit (no D-Bus), libvirtd lets in only root unless told to trust a group.
POLKIT_HINT = (
    "libvirtd asks polkit, which does not run here: let the libvirt group in with "
    '`unix_sock_group = "libvirt"`, `unix_sock_rw_perms = "0770"` and `auth_unix_rw = "none"` '
    "in /etc/libvirt/libvirtd.conf, restart libvirtd (scripts/engine-qemu.sh does both), and "
    "add the user to the libvirt group"
)
_POLKIT_MARKERS = ("system bus", "polkit")
_SOCKET_IN_TEXT = re.compile(r"socket to '([^']+)'")

# QEMU's words when it cannot listen on a forward's node port (taken since it was picked).
_PORT_TAKEN = "could not set up host forwarding rule"
# libvirt's words for an answer over its 4 MiB string limit (a guest command's output).
_TOO_LARGE = "unable to encode message payload"
_MEMORY_MARKERS = ("cannot allocate memory", "out of memory", "not enough memory")


def unreachable_message(uri: str, reason: str = "") -> str:
    message = f"libvirt daemon not reachable at {uri}: {START_HINT}"
    return f"{message} ({reason})" if reason else message


def _code(exc: libvirt.libvirtError) -> int:
    code = exc.get_error_code()
    return int(code) if code is not None else -1


def _domain(exc: libvirt.libvirtError) -> int:
    domain = exc.get_error_domain()
    return int(domain) if domain is not None else -1


def _program_missing(code: int, domain: int, lowered: str) -> bool:
    """The guest agent could not start a command: libvirt reports the agent's error
    as an internal error of its QEMU driver, in the agent's words."""
    return (
        code == libvirt.VIR_ERR_INTERNAL_ERROR
        and domain == libvirt.VIR_FROM_QEMU
        and "'guest-exec'" in lowered
        and ("failed to execute" in lowered or "no such file" in lowered)
    )


def port_taken(exc: libvirt.libvirtError) -> bool:
    """Did QEMU fail to start because a published port's node port was taken meanwhile?
    (The caller picks other node ports and starts again.)"""
    text = (exc.get_error_message() or str(exc)).lower()
    return _code(exc) == libvirt.VIR_ERR_INTERNAL_ERROR and _PORT_TAKEN in text


def _connection_failed(code: int, domain: int) -> bool:
    return code in (libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_RPC) or (
        code == libvirt.VIR_ERR_SYSTEM_ERROR
        and domain in (libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE)
    )


def translate(exc: BaseException, *, uri: str, action: str) -> VendettaError:
    """The ``common.errors`` exception for ``exc``, raised while ``action``."""
    if isinstance(exc, VendettaError):
        return exc
    if not isinstance(exc, libvirt.libvirtError):
        if isinstance(exc, OSError):
            return EngineUnavailableError(f"{action}: {exc}")
        return InternalError(f"{action}: unexpected error: {exc!r}")
    code, domain = _code(exc), _domain(exc)
    text = (exc.get_error_message() or str(exc)).strip()
    lowered = text.lower()
    if code == libvirt.VIR_ERR_NO_DOMAIN or _program_missing(code, domain, lowered):
        return NotFoundError(f"{action}: {text}")
    if code == libvirt.VIR_ERR_DOM_EXIST or (
        code == libvirt.VIR_ERR_OPERATION_FAILED and "already exists" in lowered
    ):
        return AlreadyExistsError(f"{action}: {text}")
    if _TOO_LARGE in lowered:  # an RPC error, but the connection is fine
        return FailedPreconditionError(
            f"{action}: the answer is larger than libvirt passes in one message (about 3 MiB "
            f"of a command's output through the guest agent): write the output to a file in "
            f"the guest and read it in parts ({text})"
        )
    if _connection_failed(code, domain):
        if "permission denied" in lowered:
            found = _SOCKET_IN_TEXT.search(text)
            path = found.group(1) if found else DEFAULT_SOCKET
            return PermissionDeniedError(
                f"{action}: libvirt at {uri} refused this user: {permission_hint(path, 'libvirt')}"
            )
        return EngineUnavailableError(unreachable_message(uri, text))
    if _POLKIT_MARKERS[0] in lowered or _POLKIT_MARKERS[1] in lowered:
        return PermissionDeniedError(
            f"{action}: libvirt at {uri} refused this user: {POLKIT_HINT} ({text})"
        )
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


def libvirt_errors(uri: str, action: str) -> contextlib.AbstractContextManager[None]:
    """Re-raise libvirt errors from the block as ``common.errors``, chained."""
    return translated((libvirt.libvirtError,), lambda exc: translate(exc, uri=uri, action=action))


@contextlib.contextmanager
def guest_running(dom: libvirt.virDomain) -> Iterator[None]:
    """A libvirt error from the block, of a guest that has stopped, as ``NotRunningError``.

    Blocking. A guest that is gone altogether keeps the error it raised (not found).
    """
    try:
        yield
    except libvirt.libvirtError as exc:
        if _stopped(dom):
            raise NotRunningError(f"the guest {dom.name()} is not running") from exc
        raise


def _stopped(dom: libvirt.virDomain) -> bool:
    try:
        return not dom.isActive()
    except libvirt.libvirtError:  # gone altogether, or libvirt is not answering
        return False
