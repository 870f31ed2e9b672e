"""Images: make sure an environment's image is on the engine, pulling it once if not.

Blocking functions: the provider calls them through ``asyncio.to_thread``.

A pull is bounded by a *stall* timeout. docker-py's ``pull()`` always waits
without a timeout, and when no registry answers dockerd itself takes a long
time to give up (measured here, with a registry address that accepts TCP
connections and then says nothing: 25 s, a TLS handshake timeout and then an
HTTP one; an unreachable DNS name fails in ~10 ms). So the pull request is
made with the client's requests API and a read timeout: a pull that makes
progress may take as long as it needs, one that is silent for
``stall_timeout`` seconds is abandoned (closing the request cancels the pull
in dockerd).
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import docker.auth
import docker.errors
import docker.utils
import requests.exceptions
import urllib3.exceptions

from common.errors import ImageNotFoundError
from providers.docker.errors import IMAGE_HINT

DEFAULT_PULL_STALL_TIMEOUT = 20.0


def image_present(api: Any, image: str) -> bool:
    try:
        api.inspect_image(image)
    except docker.errors.NotFound:
        return False
    return True


def _error_text(response: Any) -> str:
    try:
        body = response.json()
    except ValueError:
        return (response.text or "").strip() or f"HTTP {response.status_code}"
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    return f"HTTP {response.status_code}"


def pull_image(api: Any, image: str, *, stall_timeout: float) -> str | None:
    """Pull ``image`` once; None on success, else why it failed (for a message)."""
    repository, tag = docker.utils.parse_repository_tag(image)
    try:
        registry, _ = docker.auth.resolve_repository_name(repository)
        # Credentials from ~/.docker/config.json, exactly as docker-py's pull() sends them.
        auth_header = docker.auth.get_config_header(api, registry)
    except docker.errors.DockerException as exc:
        return str(exc)
    headers = {"X-Registry-Auth": auth_header} if auth_header else {}
    url = f"{api.base_url}/v{api.api_version}/images/create"
    params = {"fromImage": repository, "tag": tag or "latest"}
    stalled = f"no progress for {stall_timeout:g}s (is a registry reachable from this node?)"
    try:
        response = api.post(
            url,
            params=params,
            headers=headers,
            stream=True,
            timeout=(stall_timeout, stall_timeout),
        )
    except requests.exceptions.Timeout:
        return stalled
    with contextlib.closing(response):
        if response.status_code >= 400:
            return _error_text(response)
        try:
            for line in response.iter_lines():
                if not line:
                    continue
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                if isinstance(message, dict) and message.get("error"):
                    return str(message["error"])
        except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError):
            return stalled
    return None


def ensure_image(api: Any, image: str, *, stall_timeout: float) -> None:
    """Return if ``image`` is on the engine or could be pulled; else ImageNotFoundError."""
    if image_present(api, image):
        return
    reason = pull_image(api, image, stall_timeout=stall_timeout)
    if reason is None:
        if image_present(api, image):
            return
        reason = "the pull ended but the image is still not there"
    raise ImageNotFoundError(
        f"image {image!r} is not on this node and could not be pulled: {reason}; {IMAGE_HINT}"
    )
