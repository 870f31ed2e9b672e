"""The argument checks of the provider contract, made once for every engine."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import InvalidArgumentError
from common.names import validate_name

if TYPE_CHECKING:
    from providers.base import EnvironmentSpec


def check_env(env: Mapping[str, str]) -> None:
    """Variable names an exec or terminal may set (no '=', no NUL, not empty)."""
    for key in env:
        if not key or "=" in key or "\0" in key:
            raise InvalidArgumentError(f"invalid environment variable name {key!r}")


def check_command(what: str, argv: Sequence[str], env: Mapping[str, str] | None) -> None:
    if not argv:
        raise InvalidArgumentError(f"{what} needs a command: argv is empty")
    check_env(env or {})


def check_spec(provider: str, spec: EnvironmentSpec) -> None:
    validate_name("workspace", spec.workspace)
    if not spec.image:
        raise InvalidArgumentError(
            f"workspace {spec.workspace!r} has no image: set {provider}.image in "
            ".vendetta/config.yaml"
        )
    if spec.cpus is not None and spec.cpus <= 0:
        raise InvalidArgumentError(f"cpus must be positive, got {spec.cpus}")
    if spec.memory_bytes is not None and spec.memory_bytes <= 0:
        raise InvalidArgumentError(f"memory must be positive, got {spec.memory_bytes} bytes")
    if spec.disk_bytes is not None and spec.disk_bytes <= 0:
        raise InvalidArgumentError(f"disk must be positive, got {spec.disk_bytes} bytes")
    if spec.command is not None and not spec.command:
        raise InvalidArgumentError("command must not be empty (leave it unset to idle)")
    check_env(spec.env)
    for port in spec.ports:
        if not 1 <= port <= 65535:
            raise InvalidArgumentError(f"port {port} is not a TCP port (1-65535)")
    check_source(spec)


# A user inside as images name them: a name, a uid, or uid:gid (name:group too).
_USER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,31})?$")


def check_source(spec: EnvironmentSpec) -> None:
    """The source's folder on the node, where it goes inside, and who owns it there."""
    if spec.workdir and (
        not spec.workdir.startswith("/")
        or "\0" in spec.workdir
        or ".." in spec.workdir.split("/")
        or spec.workdir.rstrip("/") == ""
    ):
        raise InvalidArgumentError(
            f"workdir {spec.workdir!r} must be an absolute folder inside, not / "
            "(for example /workspace): fix `workdir:` in .vendetta/config.yaml"
        )
    if spec.user and not _USER.fullmatch(spec.user):
        raise InvalidArgumentError(
            f"user {spec.user!r} is not a user name, uid or uid:gid: fix `user:` in "
            ".vendetta/config.yaml"
        )
    if spec.source_path:
        path = Path(spec.source_path)
        if not path.is_absolute() or not path.is_dir():
            raise InvalidArgumentError(
                f"the source of workspace {spec.workspace!r} is not a folder on this node: "
                f"{spec.source_path!r}; send it again (`vendetta workspace push "
                f"{spec.workspace}`)"
            )
    if spec.git_dir:
        check_git_dir(spec)


def check_git_dir(spec: EnvironmentSpec) -> None:
    """The repository's git directory of a worktree source: a folder on the node, put at
    the same path inside, which must not cover or sit in the workdir."""
    git_dir = Path(spec.git_dir)
    workdir = Path(spec.source_workdir or "/")
    if (
        not spec.source_path
        or not git_dir.is_absolute()
        or ".." in git_dir.parts
        or git_dir == Path("/")
        or not git_dir.is_dir()
        or git_dir == workdir
        or workdir in git_dir.parents
        or git_dir in workdir.parents
    ):
        raise InvalidArgumentError(
            f"the git directory of workspace {spec.workspace!r} must be a folder on this node "
            f"apart from its workdir, with a source: {spec.git_dir!r}"
        )


# An image name as engines take it: a Docker reference, an LXD alias, a QEMU folder.
_IMAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@-]{0,199}$")


def check_image_import(
    provider: str, name: str, files: Mapping[str, Path], *, needs_name: bool
) -> None:
    if needs_name and not name:
        raise InvalidArgumentError(f"a {provider} image needs a name to import it under (--name)")
    if name and (not _IMAGE_NAME.fullmatch(name) or ".." in name):
        raise InvalidArgumentError(
            f"invalid image name {name!r}: letters, digits and . _ - / : @, at most 200"
        )
    if not files:
        raise InvalidArgumentError("no files to import an image from")
    for file_name, path in files.items():
        if not file_name or "/" in file_name or file_name in (".", ".."):
            raise InvalidArgumentError(f"invalid file name {file_name!r}: a plain file name")
        if not path.is_file():
            raise InvalidArgumentError(f"{file_name}: not a file")
        if path.stat().st_size == 0:
            raise InvalidArgumentError(f"{file_name} is empty")


# (offset, magic) -> kind; tar is recognised by its ustar header.
_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\x1f\x8b", "gzip"),
    (0, b"\xfd7zXZ\x00", "xz"),
    (0, b"BZh", "bzip2"),
    (0, b"\x28\xb5\x2f\xfd", "zstd"),
    (0, b"hsqs", "squashfs"),
    (0, b"QFI\xfb", "qcow2"),
    (257, b"ustar", "tar"),
)


def file_kind(path: Path) -> str:
    """What ``path`` holds by its first bytes (gzip, xz, bzip2, zstd, squashfs, qcow2,
    tar), or "" when none of these. Blocking."""
    with path.open("rb") as f:
        head = f.read(512)
    for offset, magic, kind in _MAGIC:
        if head[offset : offset + len(magic)] == magic:
            return kind
    return ""
