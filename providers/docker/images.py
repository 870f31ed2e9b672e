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
import tarfile
from pathlib import Path
from typing import Any

import docker.auth
import docker.errors
import docker.utils
import requests.exceptions
import urllib3.exceptions

from common.errors import ImageNotFoundError, InvalidArgumentError
from providers.base import ImageInfo
from providers.checks import file_kind
from providers.docker.errors import IMAGE_HINT, load_failed

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


# What `docker load` takes: a `docker save` tar, as it is or compressed.
SAVE_FORMATS = ("tar", "gzip", "xz", "bzip2", "zstd")


def image_infos(api: Any) -> list[ImageInfo]:
    """Every tagged image on the engine (one entry per tag)."""
    found: list[ImageInfo] = []
    for image in api.images():
        for tag in image.get("RepoTags") or ():
            if tag != "<none>:<none>":
                found.append(
                    ImageInfo(
                        name=tag,
                        size_bytes=int(image.get("Size") or 0),
                        created_unix_nano=int(image.get("Created") or 0) * 1_000_000_000,
                        id=str(image.get("Id", "")),
                    )
                )
    return found


def check_save_file(file_name: str, path: Path) -> None:
    """Refuse what is not a `docker save` archive before Docker sees it."""
    kind = file_kind(path)
    if kind not in SAVE_FORMATS:
        raise InvalidArgumentError(
            f"{file_name} is not a `docker save` archive (a tar, optionally compressed)"
        )
    if kind == "tar":
        try:
            with tarfile.open(path) as tar:
                names = set(tar.getnames())
        except (tarfile.TarError, OSError) as exc:
            raise InvalidArgumentError(f"{file_name} is not a readable tar: {exc}") from exc
        if not names & {"manifest.json", "index.json", "repositories"}:
            raise InvalidArgumentError(
                f"{file_name} is a tar but not a `docker save` archive (no manifest.json)"
            )


def load(api: Any, path: Path, name: str) -> list[str]:
    """``docker load`` of ``path``; tagged ``name`` too if given (one image only).
    The references (or ids) of what was loaded."""
    loaded: list[str] = []
    with path.open("rb") as data:
        for message in api.load_image(data):
            if not isinstance(message, dict):
                continue
            if message.get("error") or (message.get("message") and "stream" not in message):
                raise load_failed(str(message.get("error") or message.get("message")))
            text = str(message.get("stream") or "").strip()
            for prefix in ("Loaded image:", "Loaded image ID:"):
                if text.startswith(prefix):
                    loaded.append(text[len(prefix) :].strip())
                    break
    if not loaded:
        raise load_failed("it loaded no image")
    if name:
        if len(loaded) > 1:
            raise InvalidArgumentError(
                f"the archive holds {len(loaded)} images ({', '.join(loaded)}): "
                "--name can tag only one; import it without --name"
            )
        repository, tag = docker.utils.parse_repository_tag(name)
        api.tag(loaded[0], repository, tag or "latest")
        loaded = [name if tag else f"{repository}:latest"]
    return loaded
