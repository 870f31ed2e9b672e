"""A workspace's source on the node: one folder per workspace, of the node's user,
that the environment mounts at its workdir (or copies in where it cannot mount).

The coordinator sends a tar (``PutSource``): the whole source (``replace``) or
what changed (a delta: paths to delete, then a tar of the changed files). The
tar is extracted as it arrives into a staging folder (``source_tar``), each
entry checked (no absolute paths, no ``..``, no links leading out, no devices,
no sparse files; its files' bytes bounded by the announced size): an upload
that is broken, short or unsafe leaves the folder as it was. Only then is the
folder changed, in place.

``GetSource`` sends a tar of the folder's files changed since a time (or all);
``DeleteSource`` removes the folder. Everything blocking runs in a thread.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import BinaryIO

from common.errors import FailedPreconditionError, InvalidArgumentError, VendettaError
from common.names import validate_name
from nodeagent import source_tar
from nodeagent.source_tar import Written, apply, apply_staged, pack, relative, remove, stage
from providers.base import Provider
from vendetta.v1 import nodeagent_pb2

CHUNK = source_tar.CHUNK


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
            relative(p)
        async with self._lock(start.workspace):
            await asyncio.to_thread(self.root.mkdir, mode=0o700, parents=True, exist_ok=True)
            fd, name = await asyncio.to_thread(
                tempfile.mkstemp, prefix=f".upload-{start.workspace}-", dir=self.root
            )
            spool = Path(name)
            try:
                with os.fdopen(fd, "wb") as out:
                    received, staging, written = await _receive(
                        uploads, out, self.root, folder, start.size_bytes
                    )
                try:
                    # An environment's copy first: refused there (a guest stopped), the
                    # folder stays as it was too, and the same push is tried again.
                    await self._copy_in(start.workspace, spool, start.replace, list(start.deleted))
                    await asyncio.to_thread(
                        apply_staged, self.root, folder, staging, start.replace, list(start.deleted)
                    )
                except OSError as exc:
                    raise _not_ours(start.workspace, "change", exc) from exc
                finally:
                    await asyncio.to_thread(shutil.rmtree, staging, True)
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
                    f"the source of {workspace!r} was not taken (nothing changed): its "
                    f"{provider.name} environment could not take it: {exc.message}"
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
            try:
                await asyncio.to_thread(remove, folder)
            except OSError as exc:
                raise _not_ours(workspace, "remove", exc) from exc


def _not_ours(workspace: str, what: str, exc: OSError) -> FailedPreconditionError:
    return FailedPreconditionError(
        f"cannot {what} the source of workspace {workspace!r} on this node: {exc} (files "
        "made in it by another user, such as root inside a container, are not the node "
        "user's to change; remove them from inside the workspace)"
    )


def _temporary(root: Path) -> BinaryIO:
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    return tempfile.TemporaryFile("w+b", dir=root)


async def _receive(
    uploads: AsyncIterator[nodeagent_pb2.SourceUpload],
    spool: BinaryIO,
    root: Path,
    folder: Path,
    size: int,
) -> tuple[int, Path, Written]:
    """The upload's chunks (exactly ``size`` bytes, or refused) extracted into a staging
    folder as they come (through a pipe, by a thread), and kept in ``spool`` (for an
    environment that takes a copy): (bytes received, staging folder, what it holds)."""
    if size == 0:
        received = await _check_chunks(uploads, size, lambda data: asyncio.sleep(0))
        return received, *await asyncio.to_thread(stage, root, folder, None, size)
    read_fd, write_fd = os.pipe()
    reader = os.fdopen(read_fd, "rb")
    staged = asyncio.ensure_future(asyncio.to_thread(_stage_closing, root, folder, reader, size))
    stopped = False

    def write(data: bytes) -> None:
        nonlocal stopped
        spool.write(data)
        view = memoryview(data)
        while view and not stopped:
            try:
                view = view[os.write(write_fd, view) :]
            except BrokenPipeError:
                stopped = True  # the extraction refused the tar: its error says why

    async def take(data: bytes) -> None:
        await asyncio.to_thread(write, data)
        if stopped:
            await staged  # raises why: no use reading the rest of the upload

    try:
        try:
            received = await _check_chunks(uploads, size, take)
        finally:
            os.close(write_fd)  # end-of-file for the extraction (or it stops)
    except BaseException:
        staged.add_done_callback(_discard_staging)
        raise
    staging, written = await staged
    return received, staging, written


def _stage_closing(root: Path, folder: Path, reader: BinaryIO, size: int) -> tuple[Path, Written]:
    with reader:
        return stage(root, folder, reader, size)


def _discard_staging(done: asyncio.Future[tuple[Path, Written]]) -> None:
    """A staging folder whose upload failed meanwhile: never applied."""
    if not done.cancelled() and done.exception() is None:
        shutil.rmtree(done.result()[0], ignore_errors=True)


async def _check_chunks(
    uploads: AsyncIterator[nodeagent_pb2.SourceUpload],
    size: int,
    take: Callable[[bytes], Awaitable[object]],
) -> int:
    """Hand the upload's chunks to ``take``: exactly ``size`` bytes, or refused."""
    received = 0
    async for message in uploads:
        if message.WhichOneof("upload") != "chunk":
            raise InvalidArgumentError("a source upload has one `start`, then chunks")
        received += len(message.chunk)
        if received > size:
            raise InvalidArgumentError(
                f"the source upload sent more than the {size} bytes its start announced"
            )
        await take(message.chunk)
    if received < size:
        raise InvalidArgumentError(
            f"the source upload ended after {received} of {size} bytes: nothing was changed"
        )
    return received
