"""The node's LXD daemon itself: whether it can be used (installed, initialised),
and the images it has. Blocking calls on a pylxd client (run in a thread),
but for :func:`missing_install`.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any

import pylxd.exceptions

from common.errors import ImageNotFoundError
from providers.base import INSTALLED, USABLE, Readiness

MAX_IMAGES = 20

INIT_HINT = "LXD is not initialised: run `lxd init --auto` or scripts/engine-lxd.sh"
IMAGE_HINT = (
    "import it on the node (`lxc image import META ROOTFS --alias NAME`, or "
    "scripts/engine-lxd.sh for vendetta/busybox) or set lxd.image in .vendetta/config.yaml"
)


def missing_install(socket: str | None) -> Readiness | None:
    """Not ready, if there is no LXD socket at ``socket`` and no ``lxd`` on the PATH."""
    if not socket or os.path.exists(socket):
        return None
    installed = any(
        os.access(os.path.join(d, "lxd"), os.X_OK)
        for d in os.environ.get("PATH", "").split(os.pathsep)
    )
    if installed:
        return None
    return Readiness(
        ready=False,
        detail="LXD is not installed: `apt-get install -y lxd` (or run scripts/engine-lxd.sh)",
        failed=INSTALLED,
    )


def image_names(client: Any) -> list[str]:
    """The images on the daemon: their aliases, or a short fingerprint for those with none."""
    names: list[str] = []
    for info in client.api.images.get(params={"recursion": 1}).json()["metadata"]:
        aliases = [a["name"] for a in info.get("aliases") or ()]
        names.extend(aliases or [str(info.get("fingerprint", ""))[:12]])
    return sorted(names)


def _problem(client: Any) -> str:
    """What keeps the daemon from creating containers ("" if nothing)."""
    pools = [p.rsplit("/", 1)[-1] for p in client.api["storage-pools"].get().json()["metadata"]]
    if "default" not in pools:
        return f"{INIT_HINT} (no storage pool named default)"
    profile = client.api.profiles["default"].get().json()["metadata"]
    disks = [
        d
        for d in (profile.get("devices") or {}).values()
        if d.get("type") == "disk" and d.get("path") == "/"
    ]
    if not disks:
        return f"{INIT_HINT} (the default profile has no root disk)"
    return ""


def readiness(client: Any, where: str) -> Readiness:
    """The daemon's version, whether it is initialised, and its images."""
    env = client.api.get().json()["metadata"].get("environment") or {}
    version = str(env.get("server_version", "?"))
    problem = _problem(client)
    if problem:
        return Readiness(ready=False, detail=problem, version=version, failed=USABLE)
    return Readiness(
        ready=True,
        detail=(
            f"LXD {version} ({env.get('driver', '?')} {env.get('driver_version', '')}, "
            f"storage {env.get('storage', '?')}) at {where}"
        ),
        version=version,
        images=tuple(image_names(client)[:MAX_IMAGES]),
    )


def resolve_image(client: Any, image: str) -> str:
    """The fingerprint of ``image`` (an alias or a fingerprint prefix)."""
    with contextlib.suppress(pylxd.exceptions.NotFound):
        alias = client.api.images.aliases[image].get().json()["metadata"]
        return str(alias["target"])
    if re.fullmatch(r"[0-9a-f]{6,64}", image):
        with contextlib.suppress(pylxd.exceptions.NotFound):
            return str(client.api.images[image].get().json()["metadata"]["fingerprint"])
    have = ", ".join(image_names(client)[:MAX_IMAGES]) or "none"
    raise ImageNotFoundError(
        f"image {image!r} is not on this node's LXD (images here: {have}): {IMAGE_HINT}"
    )
