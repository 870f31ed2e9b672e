"""Images on the node's LXD daemon: listing them, and importing one from its files.
Blocking calls on a pylxd client (run in a thread).

LXD takes an image as a metadata tarball (``metadata.yaml`` at its top) and a
root filesystem (squashfs or tarball; a qcow2 disk for a VM), or as one
unified tarball holding both (``metadata.yaml`` and ``rootfs/``): what
``lxc image export`` writes. LXD names an image by its fingerprint, the
sha256 of those files: one already there only gets the new alias.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import tarfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pylxd.exceptions
import pylxd.models

from common.errors import AlreadyExistsError, InvalidArgumentError
from providers.base import ImageInfo
from providers.checks import file_kind

TARBALLS = ("tar", "gzip", "xz", "bzip2", "zstd")
ROOTFS_KINDS = ("squashfs", "qcow2", *TARBALLS)
FORMATS = (
    "`lxc image export` output: a metadata tarball (metadata.yaml) and a root filesystem "
    "(squashfs, tarball or qcow2), or one unified tarball (metadata.yaml and rootfs/)"
)


def _created(text: str) -> int:
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return 0
    return max(0, int(when.timestamp() * 1e9))


def image_infos(client: Any) -> list[ImageInfo]:
    """One entry per alias (a short fingerprint for an image without one)."""
    found: list[ImageInfo] = []
    for info in client.api.images.get(params={"recursion": 1}).json()["metadata"]:
        fingerprint = str(info.get("fingerprint", ""))
        aliases = [a["name"] for a in info.get("aliases") or ()] or [fingerprint[:12]]
        for alias in aliases:
            found.append(
                ImageInfo(
                    name=alias,
                    size_bytes=int(info.get("size") or 0),
                    created_unix_nano=_created(str(info.get("created_at") or "")),
                    id=fingerprint,
                )
            )
    return found


def _has_member(path: Path, wanted: str) -> tuple[bool, bool]:
    """(has ``wanted`` at its top, has a rootfs/ folder), reading until it knows."""
    found, rootfs = False, False
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                found = found or name == wanted
                rootfs = rootfs or name == "rootfs" or name.startswith("rootfs/")
                if found and rootfs:
                    break
    except (tarfile.TarError, OSError, EOFError):
        return False, False
    return found, rootfs


def split(files: Mapping[str, Path]) -> tuple[Path, Path | None]:
    """(metadata or unified tarball, root filesystem or None): the files checked for
    being what LXD imports."""
    if len(files) not in (1, 2):
        raise InvalidArgumentError(f"LXD imports one or two files ({FORMATS}), not {len(files)}")
    kinds = {name: file_kind(path) for name, path in files.items()}
    if len(files) == 1:
        [(name, path)] = files.items()
        meta, rootfs = (
            _has_member(path, "metadata.yaml") if kinds[name] in TARBALLS else (False, False)
        )
        if not (meta and rootfs):
            raise InvalidArgumentError(
                f"{name} is not a unified LXD image tarball (metadata.yaml and rootfs/); "
                f"LXD takes {FORMATS}"
            )
        return path, None
    # The metadata tarball is the small one: look at it first.
    by_size = sorted(files.items(), key=lambda item: item[1].stat().st_size)
    (meta_name, meta_path), (root_name, root_path) = by_size
    if not (kinds[meta_name] in TARBALLS and _has_member(meta_path, "metadata.yaml")[0]):
        raise InvalidArgumentError(
            f"neither file is an LXD metadata tarball (metadata.yaml at its top): {meta_name} "
            f"is not, and {root_name} is the larger; LXD takes {FORMATS}"
        )
    if kinds[root_name] not in ROOTFS_KINDS:
        raise InvalidArgumentError(
            f"{root_name} is not a root filesystem LXD takes (squashfs, tarball or qcow2)"
        )
    return meta_path, root_path


def fingerprint(first: Path, second: Path | None) -> str:
    digest = hashlib.sha256()
    for path in (first, second):
        if path is None:
            continue
        with path.open("rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def import_image(client: Any, alias: str, first: Path, second: Path | None, digest: str) -> str:
    """Import (unless its fingerprint is there) and alias it; the fingerprint. An image
    this call made is deleted again if aliasing fails."""
    with contextlib.suppress(pylxd.exceptions.NotFound):
        target = client.api.images.aliases[alias].get().json()["metadata"]["target"]
        raise AlreadyExistsError(
            f"LXD already has an image named {alias!r} ({str(target)[:12]}): pick another "
            f"--name, or remove it on the node with `lxc image alias delete {alias}`"
        )
    try:
        image = pylxd.models.Image.get(client, digest)
        made = False
    except pylxd.exceptions.NotFound:
        with contextlib.ExitStack() as files:
            data = files.enter_context(first.open("rb"))
            if second is None:
                image = pylxd.models.Image.create(client, data)
            else:
                rootfs = files.enter_context(second.open("rb"))
                vm = file_kind(second) == "qcow2"
                image = pylxd.models.Image.create(client, rootfs, metadata=data, vm=vm)
        made = True
    try:
        image.add_alias(alias, "imported by vendetta")
    except BaseException:
        if made:
            with contextlib.suppress(Exception):
                image.delete(wait=True)
        raise
    return str(image.fingerprint)
