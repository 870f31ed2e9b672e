"""Batch a stream of items: gRPC streaming costs per message, not per byte."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

T = TypeVar("T")


async def batched(
    source: AsyncIterator[T],
    *,
    max_items: int = 512,
    max_bytes: int = 256 * 1024,
    size: Callable[[T], int] = lambda _: 64,
) -> AsyncIterator[list[T]]:
    """Yield lists of whatever ``source`` has produced, without waiting for a full batch.

    A reader task drains ``source`` into a list; each batch is everything there
    (up to the limits) once at least one item is, so latency stays that of a
    single item while throughput gets the batching. Errors of the source are
    raised here, after the items before them; closing this generator cancels
    the reader.

    A plain list and two events rather than an asyncio.Queue: a busy log moves
    every line through here, and a queue's put/get cost more per line (~1.8 us
    on a loaded 2-core machine) than the rest of the agent's loop-side work.
    """
    pending: list[T] = []
    failed: list[Exception] = []
    finished = False
    ready = asyncio.Event()  # pending has items, or the reader is done
    room = asyncio.Event()  # the reader may go on (the consumer is not behind)
    room.set()
    limit = max_items * 4

    async def pump() -> None:
        nonlocal finished
        try:
            async for item in source:
                pending.append(item)
                ready.set()
                if len(pending) >= limit:
                    room.clear()
                    await room.wait()
        except Exception as exc:  # handed to the consumer, raised there
            failed.append(exc)
        finished = True
        ready.set()

    task = asyncio.create_task(pump())
    try:
        while True:
            await ready.wait()
            ready.clear()
            items = pending[:]
            pending.clear()
            room.set()
            done = finished
            batch: list[T] = []
            total = 0
            for item in items:
                batch.append(item)
                total += size(item)
                if len(batch) >= max_items or total >= max_bytes:
                    yield batch
                    batch, total = [], 0
            if batch:
                yield batch
            if done and not pending:
                if failed:
                    raise failed[0]
                return
    finally:
        task.cancel()
        await asyncio.wait({task})  # unlike `await task`, keeps our own cancellation
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
