"""The Docker provider's one error seam: docker-py and requests errors into ``common.errors``.

Every docker-py call in this package runs inside :func:`docker_errors` (or its
exceptions go through :func:`translate`), so no ``docker.errors`` or
``requests`` exception leaves the provider, and only this module reads what
Docker's answers say. Most specific first:

    docker.errors.ImageNotFound            -> ImageNotFoundError
    docker.errors.NotFound                 -> NotFoundError
    docker.errors.APIError 409             -> AlreadyExistsError ("already in use"),
                                              NotRunningError ("is not running") or
                                              FailedPreconditionError (another wrong state)
    docker.errors.APIError 400             -> InvalidArgumentError
    docker.errors.APIError 401/403         -> PermissionDeniedError
    docker.errors.APIError 503             -> EngineUnavailableError
    docker.errors.APIError 5xx             -> FailedPreconditionError (the engine could not do it)
    docker.errors.APIError other           -> InternalError
    requests Timeout (not connect)         -> DeadlineExceededError
    requests ConnectionError, connect-type
      DockerException, socket errors       -> EngineUnavailableError (says how to start Docker)
    docker InvalidArgument/InvalidRepository-> InvalidArgumentError
    any other DockerException              -> InternalError
"""

from __future__ import annotations

import contextlib

import docker.errors
import requests.exceptions
import urllib3.exceptions

from common.errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    EngineUnavailableError,
    FailedPreconditionError,
    ImageNotFoundError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    NotRunningError,
    PermissionDeniedError,
    VendettaError,
)
from providers.access import permission_hint, socket_path
from providers.errors import translated

START_HINT = "start it (e.g. `dockerd &` or `systemctl start docker`) or set DOCKER_HOST"
IMAGE_HINT = (
    "build or load it on the node (docker pull/docker load/docker import) "
    "or set docker.image in .vendetta/config.yaml"
)

# What a failing call into docker-py can raise (APIError is a requests error and
# an OSError; urllib3 errors escape from raw response reads).
MAPPED_EXCEPTIONS: tuple[type[Exception], ...] = (
    docker.errors.DockerException,
    requests.exceptions.RequestException,
    urllib3.exceptions.HTTPError,
    OSError,
)

_CONNECTION_MARKERS = (
    "error while fetching server api version",
    "connection aborted",
    "connection refused",
    "no such file or directory",
    "failed to establish a new connection",
    "max retries exceeded",
    "permission denied",
)


def unreachable_message(where: str, reason: str = "") -> str:
    """The one message for "no Docker daemon answers at ``where``"."""
    path = socket_path(where)
    if "permission denied" in reason.lower() and path:
        return f"Docker daemon at {where} refused this user: {permission_hint(path, 'docker')}"
    message = f"Docker daemon not reachable at {where}: {START_HINT}"
    if reason:
        message += f" ({reason})"
    return message


def _explanation(exc: docker.errors.APIError) -> str:
    explanation = exc.explanation
    if isinstance(explanation, bytes):
        explanation = explanation.decode("utf-8", "replace")
    text = str(explanation or "").strip()
    return text or str(exc)


def _status_code(exc: docker.errors.APIError) -> int | None:
    response = getattr(exc, "response", None)
    code = getattr(response, "status_code", None)
    return code if isinstance(code, int) else None


def _looks_like_connection_failure(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, requests.exceptions.ConnectionError | ConnectionError):
            return True
        if isinstance(current, FileNotFoundError | PermissionError):
            return True
        current = current.__cause__ or current.__context__
    text = str(exc).lower()
    return any(marker in text for marker in _CONNECTION_MARKERS)


def removal_in_progress(exc: BaseException) -> bool:
    """Whether ``exc`` is Docker refusing to remove a container that is being removed
    already (by someone else): for whoever wants it gone, that is done."""
    return (
        isinstance(exc, docker.errors.APIError)
        and _status_code(exc) == 409
        and "in progress" in _explanation(exc)
    )


def translate(exc: BaseException, *, where: str, action: str) -> VendettaError:
    """The ``common.errors`` exception for ``exc``, raised while ``action`` (e.g. "starting x")."""
    if isinstance(exc, VendettaError):
        return exc
    if isinstance(exc, docker.errors.ImageNotFound):
        return ImageNotFoundError(f"{action}: {_explanation(exc)}: {IMAGE_HINT}")
    if isinstance(exc, docker.errors.NotFound):
        return NotFoundError(f"{action}: {_explanation(exc)}")
    if isinstance(exc, docker.errors.APIError):
        status = _status_code(exc)
        explanation = _explanation(exc)
        if status == 409:
            lowered = explanation.lower()
            if "already in use" in lowered or "already exists" in lowered:
                return AlreadyExistsError(f"{action}: {explanation}")
            if "is not running" in lowered:  # an exec in a stopped container
                return NotRunningError(f"{action}: {explanation}")
            return FailedPreconditionError(f"{action}: {explanation}")
        if status == 400:
            return InvalidArgumentError(f"{action}: {explanation}")
        if status in (401, 403):
            return PermissionDeniedError(f"{action}: {explanation}")
        if status == 503:
            return EngineUnavailableError(
                f"{action}: {explanation}: the Docker engine at {where} "
                "is not ready; retry, or check `journalctl -u docker`"
            )
        if status is not None and status >= 500:
            return FailedPreconditionError(
                f"{action}: the Docker engine at {where} failed: {explanation}"
            )
        return InternalError(
            f"{action}: unexpected answer from the Docker engine ({status}): {explanation}"
        )
    if isinstance(exc, requests.exceptions.Timeout) and not isinstance(
        exc, requests.exceptions.ConnectTimeout
    ):
        return DeadlineExceededError(
            f"{action}: the Docker daemon at {where} did not answer in time ({exc}); "
            "check that it is not overloaded or hung (`docker info`)"
        )
    if isinstance(exc, docker.errors.TLSParameterError):
        return EngineUnavailableError(
            f"{action}: cannot talk TLS to the Docker daemon at {where}: {exc}; "
            "check DOCKER_TLS_VERIFY and DOCKER_CERT_PATH"
        )
    if isinstance(
        exc,
        docker.errors.InvalidArgument
        | docker.errors.InvalidRepository
        | docker.errors.NullResource,
    ):
        return InvalidArgumentError(f"{action}: {exc}")
    if isinstance(
        exc, requests.exceptions.RequestException | urllib3.exceptions.HTTPError | OSError
    ) or (isinstance(exc, docker.errors.DockerException) and _looks_like_connection_failure(exc)):
        # No action prefix: the message reads the same from every call (and readiness).
        return EngineUnavailableError(unreachable_message(where, str(exc)))
    return InternalError(f"{action}: unexpected error from docker-py: {exc!r}")


def docker_errors(where: str, action: str) -> contextlib.AbstractContextManager[None]:
    """Re-raise docker-py/requests errors from the block as ``common.errors``, chained."""
    return translated(MAPPED_EXCEPTIONS, lambda exc: translate(exc, where=where, action=action))


def load_failed(message: str) -> VendettaError:
    """``docker load`` streamed an error: the file is not an image Docker can load."""
    return InvalidArgumentError(
        f"Docker could not load the file: {message.strip()} (it takes what `docker save` "
        "writes: a tar, optionally compressed)"
    )
