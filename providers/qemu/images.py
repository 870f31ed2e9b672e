"""The guest images on this node, and the per-guest disk made from one. Blocking helpers.

An image is a directory under an image directory holding the kernel, the
initrd and the root filesystem (``IMAGE_FILES``, built by
``scripts/build-guest-image.sh``). Each guest boots on a qcow2 overlay of the
image's root filesystem, so the image itself is never written.

An agent searches a list of image directories, the first holding an image by a
name wins, and imports into the first of them (``provider.default_image_dirs``:
a non-root agent's own folder, then root's, which it may only read).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from common.errors import (
    AlreadyExistsError,
    EngineUnavailableError,
    FailedPreconditionError,
    ImageNotFoundError,
    InternalError,
    InvalidArgumentError,
)
from providers.access import unreachable_by_others
from providers.base import ImageInfo
from providers.checks import file_kind
from providers.qemu.errors import IMAGE_HINT

DEFAULT_IMAGE_DIR = Path("/var/cache/vendetta/images")
# Where guests' disks, consoles and sockets go, when not the default (see provider.py).
STATE_DIR_ENV = "VENDETTA_QEMU_STATE_DIR"
DEFAULT_IMAGE = "debian-12"
IMAGE_FILES = ("vmlinuz", "initrd.img", "rootfs.qcow2")

_IMAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _found(image_dirs: Sequence[Path]) -> dict[str, Path]:
    """Each complete image's name -> its folder, the first directory holding it winning."""
    found: dict[str, Path] = {}
    for image_dir in image_dirs:
        try:
            entries = sorted(image_dir.iterdir())
        except OSError:
            continue
        for e in entries:
            # Not a name an image may have: an import's staging folder (".import-…")
            # whose files are all written but which is not renamed yet.
            if not _IMAGE_NAME.fullmatch(e.name):
                continue
            if e.name not in found and all((e / f).is_file() for f in IMAGE_FILES):
                found[e.name] = e
    return found


def images(image_dirs: Sequence[Path]) -> list[str]:
    """The complete images under ``image_dirs``, sorted."""
    return sorted(_found(image_dirs))


def where(image_dirs: Sequence[Path]) -> str:
    return " or ".join(str(d) for d in image_dirs)


FORMATS = (
    "a guest image's three files, by these names: vmlinuz (the kernel), initrd.img and "
    "rootfs.qcow2 (the root filesystem, a qcow2 without a backing file), or their folder"
)


def image_infos(image_dirs: Sequence[Path]) -> list[ImageInfo]:
    """The complete images, with their files' total size and the folder's time."""
    found: list[ImageInfo] = []
    for name, folder in sorted(_found(image_dirs).items()):
        try:
            size = sum((folder / f).stat().st_size for f in IMAGE_FILES)
            created = folder.stat().st_mtime_ns
        except OSError:
            continue
        found.append(ImageInfo(name=name, size_bytes=size, created_unix_nano=created))
    return found


def _backing_file(rootfs: Path) -> str:
    try:
        info = subprocess.run(
            ["qemu-img", "info", "--output=json", str(rootfs)],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError as exc:
        raise EngineUnavailableError(
            "qemu-img not found: install qemu-utils (bash scripts/engine-qemu.sh)"
        ) from exc
    if info.returncode != 0:
        raise InvalidArgumentError(f"rootfs.qcow2 is not a readable qcow2: {info.stderr.strip()}")
    return str(json.loads(info.stdout).get("backing-filename") or "")


def import_files(image_dirs: Sequence[Path], name: str, files: Mapping[str, Path]) -> None:
    """Put ``files`` (IMAGE_FILES by name) in ``image_dirs[0]/name`` whole or not at all;
    refused when any of ``image_dirs`` has an image by that name."""
    image_dir = image_dirs[0]
    image_paths_check = _IMAGE_NAME.fullmatch(name) and ".." not in name and "/" not in name
    if not image_paths_check:
        raise InvalidArgumentError(
            f"invalid guest image name {name!r}: a folder name (e.g. {DEFAULT_IMAGE!r})"
        )
    if sorted(files) != sorted(IMAGE_FILES):
        raise InvalidArgumentError(
            f"a QEMU guest image is {FORMATS}; got {', '.join(sorted(files))}"
        )
    if file_kind(files["rootfs.qcow2"]) != "qcow2":
        raise InvalidArgumentError("rootfs.qcow2 is not a qcow2 disk image")
    if backing := _backing_file(files["rootfs.qcow2"]):
        raise InvalidArgumentError(
            f"rootfs.qcow2 is an overlay of {backing}: give a standalone disk "
            "(`qemu-img convert -O qcow2 IN rootfs.qcow2`)"
        )
    target = image_dir / name
    for existing in (d / name for d in image_dirs):
        if existing.exists():
            raise AlreadyExistsError(
                f"this node already has a guest image {name!r} ({existing}): pick another --name"
            )
    if problem := reachable_folder_problem(image_dir, "keep guest images"):
        raise FailedPreconditionError(problem)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".import-{name}-", dir=image_dir))
    except OSError as exc:
        raise FailedPreconditionError(
            f"cannot write guest images to {image_dir}: {exc.strerror or exc}"
        ) from exc
    try:
        for file_name, path in files.items():
            shutil.copyfile(path, staging / file_name)
            (staging / file_name).chmod(0o644)  # QEMU reads them as its own user
        staging.chmod(0o755)
        staging.rename(target)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if target.exists():
            raise AlreadyExistsError(f"a guest image {name!r} appeared meanwhile") from exc
        raise FailedPreconditionError(
            f"cannot write guest image {name!r} to {image_dir}: {exc.strerror or exc}"
        ) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(staging, ignore_errors=True)
        raise


def image_paths(image_dirs: Sequence[Path], image: str) -> tuple[Path, Path, Path]:
    """(kernel, initrd, root filesystem) of ``image``; the error says which images there are."""
    if not _IMAGE_NAME.fullmatch(image) or ".." in image:
        raise InvalidArgumentError(
            f"invalid guest image name {image!r}: a directory name under {where(image_dirs)} "
            f"(e.g. {DEFAULT_IMAGE!r})"
        )
    found = _found(image_dirs)
    if image not in found:
        partial = [d / image for d in image_dirs if (d / image).exists()]
        lacks = [
            f"{base} lacks {', '.join(f for f in IMAGE_FILES if not (base / f).is_file())}"
            for base in partial
        ]
        why = "; ".join(lacks) or f"not in {where(image_dirs)}"
        have = ", ".join(sorted(found)) or "none"
        raise ImageNotFoundError(
            f"guest image {image!r} not found on this node ({why}); images on this node: "
            f"{have}. {IMAGE_HINT}"
        )
    kernel, initrd, rootfs = (found[image] / f for f in IMAGE_FILES)
    return kernel, initrd, rootfs


def reachable_folder_problem(folder: Path, what: str, env: str = "") -> str | None:
    """Why this agent cannot write in ``folder`` (made if missing, folders on the way
    0755) where QEMU also reads, or None.

    QEMU runs as its own user under ``qemu:///system`` and opens disks (and their
    backing images) by their paths, so every folder on the way must let other
    users through.
    """
    instead = f", or set {env} to a folder of this user's" if env else ""
    missing = [d for d in (folder, *folder.parents) if not d.exists()]
    try:
        for made in reversed(missing):
            made.mkdir(mode=0o755, exist_ok=True)
            made.chmod(0o755)  # whatever the umask
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(f"{folder} is not writable by this user")
    except OSError as exc:
        return (
            f"cannot {what} in {folder}: {exc.strerror or exc}: run the agent as the "
            f"folder's owner{instead}"
        )
    if blocked := unreachable_by_others(str(folder)):
        passable = f", or set {env} to a folder others may pass through" if env else ""
        return (
            f"QEMU runs as its own user and cannot reach {folder}: {blocked} is closed to "
            f"other users: `chmod o+x {blocked}`{passable}"
        )
    return None


def state_dir_problem(state_dir: Path) -> str | None:
    """Why guests' files cannot go in ``state_dir`` (made if missing), or None."""
    return reachable_folder_problem(state_dir, "keep guests' disks", STATE_DIR_ENV)


def make_overlay(rootfs: Path, overlay: Path, disk_bytes: int | None) -> None:
    """A qcow2 overlay of ``rootfs`` at ``overlay``, grown to ``disk_bytes`` if larger."""
    state_dir = overlay.parent
    if problem := state_dir_problem(state_dir):
        raise FailedPreconditionError(problem)
    state_dir.chmod(0o755)  # QEMU runs as its own user and must reach the files
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(rootfs), "-F", "qcow2"]
    argv.append(str(overlay))
    try:
        if disk_bytes:
            argv.append(str(max(disk_bytes, _virtual_size(rootfs))))
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise EngineUnavailableError(
            "qemu-img not found: install qemu-utils (bash scripts/engine-qemu.sh)"
        ) from exc
    if result.returncode != 0:
        raise InternalError(f"creating the disk overlay failed: {result.stderr.strip()}")


def _virtual_size(image: Path) -> int:
    info = subprocess.run(
        ["qemu-img", "info", "--output=json", str(image)],
        capture_output=True,
        text=True,
        check=False,
    )
    if info.returncode != 0:
        return 0
    return int(json.loads(info.stdout).get("virtual-size", 0))


__all__ = [
    "DEFAULT_IMAGE",
    "DEFAULT_IMAGE_DIR",
    "FORMATS",
    "IMAGE_FILES",
    "STATE_DIR_ENV",
    "image_infos",
    "image_paths",
    "images",
    "import_files",
    "make_overlay",
    "reachable_folder_problem",
    "state_dir_problem",
    "where",
]
