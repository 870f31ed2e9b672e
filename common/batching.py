"""Batch a stream of items: gRPC streaming costs per message, not per byte."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

T = TypeVar("T")

_END = object()


async def batched(
    source: AsyncIterator[T],
    *,
    max_items: int = 512,
    max_bytes: int = 256 * 1024,
    size: Callable[[T], int] = lambda _: 64,
) -> AsyncIterator[list[T]]:
    """Yield lists of whatever ``source`` has produced, without waiting for a full batch.

    A reader task drains ``source`` into a queue; each batch is everything queued
    (up to the limits) once at least one item is there, so latency stays that
    of a single item while throughput gets the batching. Errors of the source
    are raised here; closing this generator cancels the reader.
    """
    queue: asyncio.Queue[object] = asyncio.Queue(maxsize=max_items * 4)

    async def pump() -> None:
        # No `finally`: when cancelled, a put on a full queue would block forever.
        try:
            async for item in source:
                await queue.put(item)
        except Exception as exc:  # handed to the consumer, raised there
            await queue.put(exc)
        else:
            await queue.put(_END)

    task = asyncio.create_task(pump())
    try:
        while True:
            first = await queue.get()
            batch: list[T] = []
            done = False
            total = 0
            item = first
            while True:
                if item is _END:
                    done = True
                    break
                if isinstance(item, Exception):
                    if batch:
                        yield batch
                    raise item
                batch.append(item)  # type: ignore[arg-type]
                total += size(item)  # type: ignore[arg-type]
                if len(batch) >= max_items or total >= max_bytes or queue.empty():
                    break
                item = queue.get_nowait()
            if batch:
                yield batch
            if done:
                return
    finally:
        task.cancel()
        await asyncio.wait({task})  # unlike `await task`, keeps our own cancellation
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
