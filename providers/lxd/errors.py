"""The LXD provider's one error seam: pylxd and transport errors into ``common.errors``.

Every pylxd call of this package runs inside :func:`lxd_errors` (or its
exceptions go through :func:`translate`), so no ``pylxd.exceptions``,
``requests`` or websocket exception leaves the provider. It is the only place
that reads LXD's status codes and messages: everything else tells errors apart
by their type. Most specific first:

    pylxd NotFound                          -> NotFoundError
    pylxd Conflict / "already exists"       -> AlreadyExistsError
    LXDAPIException "is busy running"       -> BusyError (another state operation runs)
    LXDAPIException "not running",
      "already stopped"                     -> NotRunningError
    LXDAPIException, a proxy device (a
      published port) could not listen     -> ListenError
    LXDAPIException 404, "not found",
      "no such file or directory"           -> NotFoundError
    LXDAPIException 400                     -> InvalidArgumentError
    LXDAPIException 403                     -> PermissionDeniedError
    LXDAPIException "is running", other
      4xx, and failed operations            -> FailedPreconditionError
    LXDAPIException 503                     -> EngineUnavailableError
    LXDAPIException other 5xx               -> FailedPreconditionError (LXD could not do it)
    LXDAPIExtensionNotAvailable             -> FailedPreconditionError (LXD too old)
    websocket HandshakeError                -> FailedPreconditionError (LXD refused it)
    ClientConnectionFailed, requests
      ConnectionError, OSError              -> EngineUnavailableError (says how to start LXD)
    requests Timeout                        -> DeadlineExceededError
    anything else from pylxd                -> InternalError
"""

from __future__ import annotations

import contextlib

import pylxd.exceptions
import requests.exceptions

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
    VendettaError,
)
from providers.access import permission_hint, socket_path
from providers.errors import translated
from providers.lxd.ports import is_listen_failure, is_spawn_failure
from providers.lxd.websocket import HandshakeError

START_HINT = "start it with `lxd --group lxd &` then `lxd waitready` (or run scripts/engine-lxd.sh)"


class BusyError(FailedPreconditionError):
    """LXD is running another state operation on the instance (one at a time): the
    same request may well succeed once that one is over."""


class ListenError(FailedPreconditionError):
    """The instance did not start: a proxy device (a published port) could not listen."""


class SpawnError(FailedPreconditionError):
    """The instance did not start: LXC's spawn of the container aborted."""


MAPPED_EXCEPTIONS: tuple[type[Exception], ...] = (
    HandshakeError,
    pylxd.exceptions.LXDAPIException,
    pylxd.exceptions.LXDAPIExtensionNotAvailable,
    pylxd.exceptions.ClientConnectionFailed,
    requests.exceptions.RequestException,
    OSError,
)


def unreachable_message(where: str, reason: str = "") -> str:
    """The one message for "no LXD daemon answers at ``where``"."""
    path = socket_path(where)
    if "permission denied" in reason.lower() and path:
        return f"LXD daemon at {where} refused this user: {permission_hint(path, 'lxd')}"
    message = f"LXD daemon not reachable at {where}: {START_HINT}"
    if reason:
        message += f" ({reason})"
    return message


def _status_code(exc: pylxd.exceptions.LXDAPIException) -> int | None:
    code = getattr(getattr(exc, "response", None), "status_code", None)
    return code if isinstance(code, int) else None


def _text(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:  # pylxd's __str__ reads the response; never fail on a message
        text = repr(exc)
    return text.strip() or type(exc).__name__


def translate(exc: BaseException, *, where: str, action: str) -> VendettaError:
    """The ``common.errors`` exception for ``exc``, raised while ``action``."""
    if isinstance(exc, VendettaError):
        return exc
    if isinstance(exc, pylxd.exceptions.NotFound):
        return NotFoundError(f"{action}: {_text(exc)}")
    if isinstance(exc, pylxd.exceptions.Conflict):
        return AlreadyExistsError(f"{action}: {_text(exc)}")
    if isinstance(exc, HandshakeError):
        return FailedPreconditionError(f"{action}: LXD refused the websocket: {exc}")
    if isinstance(exc, pylxd.exceptions.LXDAPIException):
        status = _status_code(exc)
        text = _text(exc)
        lowered = text.lower()
        if "already exists" in lowered:
            return AlreadyExistsError(f"{action}: {text}")
        if "is busy running" in lowered:
            return BusyError(f"{action}: LXD at {where} refused: {text}")
        if "not running" in lowered or "already stopped" in lowered:
            return NotRunningError(f"{action}: {text}")
        if is_listen_failure(text):
            return ListenError(f"{action}: LXD at {where} refused: {text}")
        if is_spawn_failure(text):
            return SpawnError(f"{action}: LXD at {where} could not start the container: {text}")
        # "no such file or directory": e.g. the console log of a container not started yet.
        if status == 404 or "not found" in lowered or "no such file or directory" in lowered:
            return NotFoundError(f"{action}: {text}")
        if status == 400 and "is running" not in lowered:
            return InvalidArgumentError(f"{action}: {text}")
        if status == 403:
            return PermissionDeniedError(f"{action}: {text}")
        if status == 503:
            return EngineUnavailableError(
                f"{action}: {text}: the LXD daemon at {where} is not ready; "
                "retry, or check `lxd waitready` and its log"
            )
        # Failed operations come back as 200 with an error; the rest are 4xx/5xx.
        return FailedPreconditionError(f"{action}: LXD at {where} refused: {text}")
    if isinstance(exc, pylxd.exceptions.LXDAPIExtensionNotAvailable):
        return FailedPreconditionError(f"{action}: {_text(exc)}: upgrade LXD on this node")
    if isinstance(exc, requests.exceptions.Timeout) and not isinstance(
        exc, requests.exceptions.ConnectTimeout
    ):
        return DeadlineExceededError(
            f"{action}: the LXD daemon at {where} did not answer in time ({exc}); "
            "check that it is not overloaded or hung (`lxc info`)"
        )
    if isinstance(
        exc,
        pylxd.exceptions.ClientConnectionFailed | requests.exceptions.RequestException | OSError,
    ):
        # No action prefix: the message reads the same from every call (and readiness).
        return EngineUnavailableError(unreachable_message(where, _text(exc)))
    return InternalError(f"{action}: unexpected error from pylxd: {exc!r}")


def lxd_errors(where: str, action: str) -> contextlib.AbstractContextManager[None]:
    """Re-raise pylxd/requests errors from the block as ``common.errors``, chained."""
    return translated(MAPPED_EXCEPTIONS, lambda exc: translate(exc, where=where, action=action))
