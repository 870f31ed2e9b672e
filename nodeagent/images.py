"""Image imports at the agent: an upload's files spooled to the node's disk, then
handed to the provider, which imports them whole or not at all.

The upload (``ImageUpload``) is a ``start`` naming the provider, the image's name
and each file with its size, then the files' bytes in chunks, file after file.
The spool folder is removed whatever happens.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

from common.errors import InvalidArgumentError
from nodeagent.providers import ProviderSet
from providers.base import ImageInfo
from vendetta.v1 import common_pb2


def image_to_pb(provider: str, image: ImageInfo) -> common_pb2.ImageInfo:
    return common_pb2.ImageInfo(
        provider=provider,
        name=image.name,
        size_bytes=image.size_bytes,
        created_unix_nano=image.created_unix_nano,
        id=image.id,
    )


def _files(start: common_pb2.ImageUploadStart) -> list[tuple[str, int]]:
    files = [(f.name, f.size_bytes) for f in start.files]
    if not files:
        raise InvalidArgumentError("an image upload names no files")
    names = [name for name, _ in files]
    if len(set(names)) != len(names):
        raise InvalidArgumentError(f"an image upload names a file twice: {', '.join(names)}")
    for name, size in files:
        if not name or "/" in name or name in (".", ".."):
            raise InvalidArgumentError(f"invalid file name {name!r} in an image upload")
        if size < 0:
            raise InvalidArgumentError(f"{name}: a negative size")
    return files


async def _spool(
    requests: AsyncIterator[common_pb2.ImageUpload], files: list[tuple[str, int]], spool: Path
) -> dict[str, Path]:
    """Write the chunks that follow ``start`` to files in ``spool``, each exactly its size."""
    paths = {name: spool / name for name, _ in files}
    pending = list(files)
    out: BinaryIO | None = None
    left = 0
    total = sum(size for _, size in files)
    received = 0
    try:
        for name, size in pending[:]:  # empty files need no chunk
            if size:
                break
            paths[name].touch()
            pending.pop(0)
        async for message in requests:
            if message.WhichOneof("upload") != "chunk":
                raise InvalidArgumentError("an image upload has one `start`, then chunks")
            data = message.chunk
            received += len(data)
            if received > total:
                raise InvalidArgumentError(
                    f"the upload sent more than the {total} bytes its start announced"
                )
            while data:
                if out is None:
                    name, left = pending.pop(0)
                    out = await asyncio.to_thread(paths[name].open, "wb")
                piece, data = data[:left], data[left:]
                await asyncio.to_thread(out.write, piece)
                left -= len(piece)
                if left == 0:
                    await asyncio.to_thread(out.close)
                    out = None
                    while pending and pending[0][1] == 0:
                        paths[pending.pop(0)[0]].touch()
    finally:
        if out is not None:
            await asyncio.to_thread(out.close)
    if received < total:
        raise InvalidArgumentError(
            f"the upload ended after {received} of {total} bytes: nothing was imported"
        )
    return paths


async def receive(
    requests: AsyncIterator[common_pb2.ImageUpload], providers: ProviderSet, spool_root: Path
) -> list[common_pb2.ImageInfo]:
    """Spool the upload, import it with its provider; what the import made or named."""
    first = await anext(aiter(requests), None)
    if first is None or first.WhichOneof("upload") != "start":
        raise InvalidArgumentError("an image upload starts with a `start` message")
    start = first.start
    provider = providers.get(start.provider)
    files = _files(start)
    await asyncio.to_thread(spool_root.mkdir, mode=0o700, parents=True, exist_ok=True)
    spool = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="import-", dir=spool_root))
    try:
        paths = await _spool(requests, files, spool)
        imported = await provider.import_image(start.name, paths)
    finally:
        await asyncio.to_thread(shutil.rmtree, spool, True)
    return [image_to_pb(provider.name, i) for i in imported]


async def list_images(providers: ProviderSet, provider: str) -> list[common_pb2.ImageInfo]:
    """The images of ``provider``, or of every ready provider when it is ""."""
    if provider:
        chosen = [providers.get(provider)]
    else:
        chosen = [p for p, ready in await providers.readiness() if ready.ready]
    found: list[common_pb2.ImageInfo] = []
    for p in chosen:
        found.extend(image_to_pb(p.name, i) for i in await p.images())
    return found
