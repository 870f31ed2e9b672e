"""A workspace's source on the node: one folder per workspace, of the node's user,
that the environment mounts at its workdir (or copies in where it cannot mount).

The coordinator sends a tar (``PutSource``): the whole source (``replace``) or
what changed (a delta: paths to delete, then a tar of the changed files). The
tar is spooled and extracted into a staging folder first, each entry checked
as tarfile's ``data`` filter would (no absolute paths, no ``..``, no links
leading out, no devices) and no sparse members, its files' bytes bounded by
the announced size: an upload that is broken, short or unsafe leaves the folder as it was.
Only then is the folder changed, in place: a running environment's mount
holds the folder itself, so it is never swapped for another one.

``GetSource`` sends a tar of the folder's files changed since a time (or all);
``DeleteSource`` removes the folder. Everything blocking runs in a thread.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from common.errors import FailedPreconditionError, InvalidArgumentError, VendettaError
from common.names import validate_name
from providers.base import Provider
from vendetta.v1 import nodeagent_pb2

CHUNK = 256 * 1024


@dataclass(frozen=True)
class Written:
    files: int
    bytes: int


def _relative(path: str) -> PurePosixPath:
    """A path inside the folder, as a delta names it; refused if it could lead out."""
    p = PurePosixPath(path)
    if not path or p.is_absolute() or ".." in p.parts or "\0" in path or p == PurePosixPath("."):
        raise InvalidArgumentError(f"invalid path {path!r} in a source delta: a relative path")
    return p


def _remove(path: Path) -> None:
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


def extract(tar_path: Path, dest: Path, limit: int) -> Written:
    """Extract the tar at ``tar_path`` into ``dest`` (which exists), each entry checked
    (``_check``) before it is written, the files' bytes at most ``limit``. Blocking."""
    files = size = 0
    if tar_path.stat().st_size == 0:
        return Written(0, 0)  # nothing changed but deletions
    where = _Resolver(os.path.realpath(dest))
    try:
        with tarfile.open(tar_path, mode="r:") as tar:
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
    except (tarfile.TarError, OSError) as exc:
        raise InvalidArgumentError(f"the source's tar cannot be extracted: {exc}") from exc
    return Written(files, size)


def _move_into(staged: Path, folder: Path) -> None:
    """Move what ``staged`` holds into ``folder``, each entry replacing the one there."""
    for entry in sorted(staged.iterdir()):
        target = folder / entry.name
        if entry.is_dir() and not entry.is_symlink():
            if target.is_symlink() or (target.exists() and not target.is_dir()):
                _remove(target)
            if target.is_dir():
                _move_into(entry, target)
                shutil.copystat(entry, target)
                continue
        elif target.is_dir() and not target.is_symlink():
            _remove(target)
        os.replace(entry, target)


def apply(
    root: Path, folder: Path, tar_path: Path, replace: bool, deleted: Sequence[str], limit: int
) -> Written:
    """Make ``folder`` what the upload says. Blocking.

    The tar goes to a staging folder first: if it is refused, nothing changed.
    ``replace``: the folder's old entries leave, the staged ones come in (the
    folder itself stays, for mounts). Otherwise ``deleted`` are removed first,
    then the staged entries replace theirs.
    """
    paths = [_relative(p) for p in deleted]
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{folder.name}-", dir=root))
    try:
        written = extract(tar_path, staging, limit)
        if not folder.is_dir():
            os.chmod(staging, 0o755)
            os.replace(staging, folder)  # a first upload: one atomic rename
            return written
        if replace:
            trash = Path(tempfile.mkdtemp(prefix=f".trash-{folder.name}-", dir=root))
            try:
                for entry in list(folder.iterdir()):
                    os.replace(entry, trash / entry.name)
                _move_into(staging, folder)
            except BaseException:
                # Renames within one filesystem: put the old entries back as they were.
                for entry in list(folder.iterdir()):
                    _remove(entry)
                for entry in list(trash.iterdir()):
                    os.replace(entry, folder / entry.name)
                raise
            finally:
                shutil.rmtree(trash, ignore_errors=True)
        else:
            for p in paths:
                _remove(folder.joinpath(*p.parts))
            _move_into(staging, folder)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def pack(folder: Path, since_unix_nano: int, out: BinaryIO) -> int:
    """A tar of ``folder``'s files and links changed after ``since_unix_nano`` (0: all
    of it, folders too) into ``out``; how many entries. Blocking."""
    count = 0
    with tarfile.open(fileobj=out, mode="w|") as tar:
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
                if since_unix_nano and info.st_mtime_ns <= since_unix_nano:
                    continue
                if not (stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode)):
                    continue  # sockets, fifos: not source
                tar.add(path, arcname=(rel / name).as_posix(), recursive=False)
                count += 1
    return count


class SourceStore:
    """The per-workspace source folders under ``root`` (the agent's folder).

    ``providers()``: the node's providers. An environment that holds a copy of its
    source (QEMU) instead of the folder itself is kept in step: an upload goes into
    it too, and what is sent back is what it holds (``Provider.copy_source_*``).
    """

    def __init__(self, root: Path, providers: Callable[[], Sequence[Provider]] = tuple) -> None:
        self.root = root
        self._providers = providers
        self._locks: dict[str, asyncio.Lock] = {}

    def folder(self, workspace: str) -> Path:
        validate_name("workspace", workspace)
        return self.root / workspace

    def _lock(self, workspace: str) -> asyncio.Lock:
        return self._locks.setdefault(workspace, asyncio.Lock())

    async def put(
        self, uploads: AsyncIterator[nodeagent_pb2.SourceUpload]
    ) -> nodeagent_pb2.SourceReceipt:
        first = await anext(aiter(uploads), None)
        if first is None or first.WhichOneof("upload") != "start":
            raise InvalidArgumentError("a source upload starts with a `start` message")
        start = first.start
        folder = self.folder(start.workspace)
        if start.size_bytes < 0:
            raise InvalidArgumentError(f"a source upload of {start.size_bytes} bytes")
        for p in start.deleted:
            _relative(p)
        async with self._lock(start.workspace):
            await asyncio.to_thread(self.root.mkdir, mode=0o700, parents=True, exist_ok=True)
            fd, name = await asyncio.to_thread(
                tempfile.mkstemp, prefix=f".upload-{start.workspace}-", dir=self.root
            )
            spool = Path(name)
            try:
                with os.fdopen(fd, "wb") as out:
                    received = await _spool(uploads, out, start.size_bytes)
                written = await asyncio.to_thread(
                    apply,
                    self.root,
                    folder,
                    spool,
                    start.replace,
                    list(start.deleted),
                    start.size_bytes,
                )
                await self._copy_in(start.workspace, spool, start.replace, list(start.deleted))
            finally:
                await asyncio.to_thread(spool.unlink, True)
        return nodeagent_pb2.SourceReceipt(path=str(folder), bytes=received, files=written.files)

    async def get(
        self, workspace: str, since_unix_nano: int
    ) -> AsyncIterator[nodeagent_pb2.SourceChunk]:
        folder = self.folder(workspace)
        if since_unix_nano < 0:
            raise InvalidArgumentError(f"since must be 0 or more, got {since_unix_nano}")
        if not await asyncio.to_thread(folder.is_dir):
            raise InvalidArgumentError(
                f"workspace {workspace!r} has no source on this node: send it with "
                f"`vendetta workspace push {workspace}`"
            )
        # Spooled first, so the tar sent is of one moment, whatever happens meanwhile.
        spool = await asyncio.to_thread(_temporary, self.root)
        try:
            async with self._lock(workspace):
                await self._copy_out(workspace, folder)
                await asyncio.to_thread(pack, folder, since_unix_nano, spool)
            await asyncio.to_thread(spool.seek, 0)
            while data := await asyncio.to_thread(spool.read, CHUNK):
                yield nodeagent_pb2.SourceChunk(data=data)
        finally:
            await asyncio.to_thread(spool.close)

    async def _copy_in(
        self, workspace: str, tar: Path, replace: bool, deleted: Sequence[str]
    ) -> None:
        for provider in self._providers():
            try:
                await provider.copy_source_in(workspace, tar, replace=replace, deleted=deleted)
            except VendettaError as exc:
                if not (await provider.readiness()).ready:
                    continue  # its engine is down: none of its environments runs
                raise FailedPreconditionError(
                    f"the source of {workspace!r} reached this node, but not its "
                    f"{provider.name} environment: {exc.message}; send it again with "
                    f"`vendetta workspace push {workspace}`"
                ) from exc

    async def _copy_out(self, workspace: str, folder: Path) -> None:
        """Where an environment holds a copy, bring what it holds into ``folder`` first."""
        fd, name = await asyncio.to_thread(
            tempfile.mkstemp, prefix=f".copied-{workspace}-", dir=self.root
        )
        os.close(fd)
        tar = Path(name)
        try:
            for provider in self._providers():
                try:
                    if not await provider.copy_source_out(workspace, tar):
                        continue
                except VendettaError:
                    if not (await provider.readiness()).ready:
                        continue
                    raise
                size = (await asyncio.to_thread(tar.stat)).st_size
                await asyncio.to_thread(apply, self.root, folder, tar, True, [], size)
                return
        finally:
            await asyncio.to_thread(tar.unlink, True)

    async def delete(self, workspace: str) -> None:
        folder = self.folder(workspace)
        async with self._lock(workspace):
            await asyncio.to_thread(_remove, folder)


def _temporary(root: Path) -> BinaryIO:
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    return tempfile.TemporaryFile("w+b", dir=root)


async def _spool(
    uploads: AsyncIterator[nodeagent_pb2.SourceUpload], out: BinaryIO, size: int
) -> int:
    """Write the upload's chunks to ``out``: exactly ``size`` bytes, or refused."""
    received = 0
    async for message in uploads:
        if message.WhichOneof("upload") != "chunk":
            raise InvalidArgumentError("a source upload has one `start`, then chunks")
        received += len(message.chunk)
        if received > size:
            raise InvalidArgumentError(
                f"the source upload sent more than the {size} bytes its start announced"
            )
        await asyncio.to_thread(out.write, message.chunk)
    if received < size:
        raise InvalidArgumentError(
            f"the source upload ended after {received} of {size} bytes: nothing was changed"
        )
    return received
