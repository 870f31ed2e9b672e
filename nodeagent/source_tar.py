"""A workspace's source folder on the node, changed by tars: safely, and in place.

Blocking functions, run in threads by ``nodeagent.sources``. A tar is extracted
into a staging folder beside the source's folder, each entry checked before it
is written (``_check``: what tarfile's ``data`` filter checks, which a node's
older Python 3.11 may lack); only a tar taken whole is then applied to the
folder (``apply_staged``), in place, never swapping the folder itself, which a
running environment's mount holds.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from common.errors import InvalidArgumentError

CHUNK = 256 * 1024


@dataclass(frozen=True)
class Written:
    files: int
    bytes: int


def relative(path: str) -> PurePosixPath:
    """A path inside the folder, as a delta names it; refused if it could lead out."""
    p = PurePosixPath(path)
    if not path or p.is_absolute() or ".." in p.parts or "\0" in path or p == PurePosixPath("."):
        raise InvalidArgumentError(f"invalid path {path!r} in a source delta: a relative path")
    return p


def remove(path: Path) -> None:
    """Remove a file, link or folder (never following a link); absent is fine."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(path)
    else:
        path.unlink()


class _Resolver:
    """Real paths under ``root``, the folders' cached until a link is extracted (which
    may change where a folder's path leads)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._folders: dict[str, str] = {}

    def real(self, rel: str) -> str:
        parent, base = os.path.split(rel)
        folder = self._folders.get(parent)
        if folder is None:
            folder = self._folders[parent] = os.path.realpath(os.path.join(self.root, parent))
        path = os.path.join(folder, base)
        return os.path.realpath(path) if os.path.islink(path) else path

    def forget(self) -> None:
        self._folders.clear()

    def inside(self, rel: str) -> bool:
        path = self.real(rel)
        return path == self.root or path.startswith(self.root + os.sep)


def _check(member: tarfile.TarInfo, where: _Resolver) -> None:
    """Refuse ``member`` unless it may be extracted into ``where.root``, and tame it.

    What tarfile's ``data`` filter checks (Python 3.11.4+; a node may have an older
    3.11), against the folder as it is now, so that a link extracted earlier cannot
    carry a later entry out: no absolute path, no ``..``, nothing that resolves
    outside, links only to inside, no devices, fifos or sparse files; no
    setuid/setgid/sticky bits nor group/other write; owned by the agent's user.
    """
    name = member.name
    if name.startswith("/") or ".." in PurePosixPath(name).parts or "\0" in name:
        raise InvalidArgumentError(f"{name!r}: absolute paths and '..' are not taken in a source")
    if member.issparse() or not (
        member.isreg() or member.isdir() or member.issym() or member.islnk()
    ):
        raise InvalidArgumentError(
            f"{name!r}: only files, folders and links are taken in a source (not sparse files)"
        )
    if not where.inside(name):
        raise InvalidArgumentError(f"{name!r} would be written outside the source's folder")
    target = member.linkname
    if member.issym() and (
        target.startswith("/") or not where.inside(os.path.join(os.path.dirname(name), target))
    ):
        raise InvalidArgumentError(f"{name!r} links outside the source's folder ({target!r})")
    if member.islnk() and (target.startswith("/") or not where.inside(target)):
        raise InvalidArgumentError(f"{name!r} links outside the source's folder ({target!r})")
    member.uid, member.gid, member.uname, member.gname = os.geteuid(), os.getegid(), "", ""
    if not member.issym():
        # No setuid/setgid/sticky nor group/other write; the owner may always change it.
        member.mode = (member.mode & 0o755) | (0o700 if member.isdir() else 0o600)


def extract(stream: BinaryIO, dest: Path, limit: int) -> Written:
    """Extract the tar read from ``stream`` into ``dest`` (which exists), each entry
    checked (``_check``) before it is written, the files' bytes at most ``limit``;
    then read the stream to its end (its writer never waits on us). Blocking."""
    files = size = 0
    where = _Resolver(os.path.realpath(dest))
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                _check(member, where)
                if member.isreg():
                    files, size = files + 1, size + member.size
                    if size > limit:
                        raise InvalidArgumentError(
                            f"the source's files hold more than the {limit} bytes its "
                            "upload announced"
                        )
                tar.extract(member, where.root, set_attrs=not member.issym(), numeric_owner=True)
                if member.issym():
                    where.forget()
        while stream.read(CHUNK):
            pass  # the end-of-archive blocks
    except (tarfile.TarError, OSError) as exc:
        raise InvalidArgumentError(f"the source's tar cannot be extracted: {exc}") from exc
    return Written(files, size)


def stage(root: Path, folder: Path, stream: BinaryIO | None, limit: int) -> tuple[Path, Written]:
    """A staging folder beside ``folder`` holding the tar of ``stream`` (None: no tar).
    Removed again if the tar is refused. Blocking."""
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{folder.name}-", dir=root))
    try:
        written = Written(0, 0) if stream is None else extract(stream, staging, limit)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging, written


def _move_into(staged: Path, folder: Path) -> None:
    """Move what ``staged`` holds into ``folder``, each entry replacing the one there."""
    for entry in sorted(staged.iterdir()):
        target = folder / entry.name
        if entry.is_dir() and not entry.is_symlink():
            if target.is_symlink() or (target.exists() and not target.is_dir()):
                remove(target)
            if target.is_dir():
                _move_into(entry, target)
                shutil.copystat(entry, target)
                continue
        elif target.is_dir() and not target.is_symlink():
            remove(target)
        os.replace(entry, target)


def apply_staged(
    root: Path, folder: Path, staging: Path, replace: bool, deleted: Sequence[str]
) -> None:
    """Make ``folder`` what the upload says, from its staging folder (then gone). Blocking.

    ``replace``: the folder's old entries leave, the staged ones come in (the folder
    itself stays, for mounts). Otherwise ``deleted`` are removed first, then the
    staged entries replace theirs.
    """
    paths = [relative(p) for p in deleted]
    try:
        if not folder.is_dir():
            os.chmod(staging, 0o755)
            os.replace(staging, folder)  # a first upload: one atomic rename
            return
        if replace:
            trash = Path(tempfile.mkdtemp(prefix=f".trash-{folder.name}-", dir=root))
            try:
                for entry in list(folder.iterdir()):
                    os.replace(entry, trash / entry.name)
                _move_into(staging, folder)
            except BaseException:
                # Renames within one filesystem: put the old entries back as they were.
                for entry in list(folder.iterdir()):
                    remove(entry)
                for entry in list(trash.iterdir()):
                    os.replace(entry, folder / entry.name)
                raise
            finally:
                shutil.rmtree(trash, ignore_errors=True)
        else:
            for p in paths:
                remove(folder.joinpath(*p.parts))
            _move_into(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def apply(
    root: Path, folder: Path, tar_path: Path, replace: bool, deleted: Sequence[str], limit: int
) -> Written:
    """``apply_staged`` of the tar file at ``tar_path`` (empty: no tar). Blocking."""
    with tar_path.open("rb") as f:
        stream = f if tar_path.stat().st_size else None
        staging, written = stage(root, folder, stream, limit)
    apply_staged(root, folder, staging, replace, deleted)
    return written


# A changes-only tar ends with a pax global header listing every file and link present
# (a JSON list), so the coordinator can tell which were deleted; tar readers skip it.
PRESENT_KEY = "VENDETTA.present"


def pack(folder: Path, since_unix_nano: int, out: BinaryIO) -> int:
    """A tar of ``folder``'s files and links changed after ``since_unix_nano`` (0: all
    of it, folders too) into ``out``; how many entries. Blocking."""
    count = 0
    present: list[str] = []
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for base, dirs, files in os.walk(folder):
            dirs.sort()
            here = Path(base)
            rel = here.relative_to(folder)
            if since_unix_nano == 0 and rel != Path("."):
                tar.add(here, arcname=rel.as_posix(), recursive=False)
                count += 1
            for name in sorted(files) + sorted(d for d in dirs if (here / d).is_symlink()):
                path = here / name
                try:
                    info = path.lstat()
                except FileNotFoundError:
                    continue  # removed while we walked
                if not (stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode)):
                    continue  # sockets, fifos: not source
                present.append((rel / name).as_posix())
                if since_unix_nano and info.st_mtime_ns <= since_unix_nano:
                    continue
                tar.add(path, arcname=(rel / name).as_posix(), recursive=False)
                count += 1
        if since_unix_nano:
            listing = tarfile.TarInfo.create_pax_global_header(
                {PRESENT_KEY: json.dumps(present, ensure_ascii=True)}
            )
            tar.fileobj.write(listing)  # as addfile writes a member's header
            tar.offset += len(listing)
            end = tarfile.TarInfo(".")  # a global header needs a member after it
            end.type, end.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(end)
    return count
