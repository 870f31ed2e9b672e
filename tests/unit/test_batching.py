"""common.batching.batched: order, limits, errors and cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import cast

import pytest

from common.batching import batched

# Every test is bounded: a hang is a failure, not a stuck suite.
TIMEOUT = 5.0


async def numbers(n: int, *, delay: float = 0.0) -> AsyncIterator[int]:
    for i in range(n):
        if delay:
            await asyncio.sleep(delay)
        yield i


async def collect(source: AsyncIterator[list[int]]) -> list[list[int]]:
    return [batch async for batch in source]


async def test_yields_every_item_in_order() -> None:
    batches = await asyncio.wait_for(collect(batched(numbers(1000))), TIMEOUT)
    assert [i for b in batches for i in b] == list(range(1000))
    assert all(batches), "no empty batches"


async def test_slow_source_is_not_held_back_for_a_full_batch() -> None:
    batches = await asyncio.wait_for(collect(batched(numbers(5, delay=0.01))), TIMEOUT)
    assert [i for b in batches for i in b] == list(range(5))
    assert len(batches) == 5, "each item arrives on its own when the source is slow"


async def test_empty_source_yields_nothing() -> None:
    assert await asyncio.wait_for(collect(batched(numbers(0))), TIMEOUT) == []


async def test_respects_max_items() -> None:
    batches = await asyncio.wait_for(collect(batched(numbers(100), max_items=7)), TIMEOUT)
    assert [i for b in batches for i in b] == list(range(100))
    assert max(len(b) for b in batches) <= 7
    # A fast source does get batched (not one item per message).
    assert len(batches) < 100


async def test_respects_max_bytes() -> None:
    batches = await asyncio.wait_for(
        collect(batched(numbers(100), max_bytes=50, size=lambda _: 10)), TIMEOUT
    )
    assert [i for b in batches for i in b] == list(range(100))
    assert max(len(b) for b in batches) <= 5


async def test_source_error_is_raised_after_earlier_items() -> None:
    async def failing() -> AsyncIterator[int]:
        yield 1
        yield 2
        raise ValueError("source broke")

    seen: list[int] = []
    with pytest.raises(ValueError, match="source broke"):
        async with asyncio.timeout(TIMEOUT):
            async for batch in batched(failing()):
                seen.extend(batch)
    assert seen == [1, 2]


async def test_closing_the_consumer_early_cancels_the_source() -> None:
    cleaned_up = asyncio.Event()
    produced = 0

    async def endless() -> AsyncIterator[int]:
        nonlocal produced
        try:
            while True:
                await asyncio.sleep(0.001)
                produced += 1
                yield produced
        finally:
            cleaned_up.set()

    gen = cast(AsyncGenerator[list[int], None], batched(endless()))
    first = await asyncio.wait_for(gen.__anext__(), TIMEOUT)
    assert first[0] == 1
    await asyncio.wait_for(gen.aclose(), TIMEOUT)
    assert cleaned_up.is_set(), "the source's finally must run when the consumer closes"
    count = produced
    await asyncio.sleep(0.02)
    assert produced == count, "the source keeps running after the consumer closed"


async def test_cancelling_the_consumer_task_cancels_the_source() -> None:
    cleaned_up = asyncio.Event()

    async def endless() -> AsyncIterator[int]:
        try:
            while True:
                await asyncio.sleep(0.001)
                yield 0
        finally:
            cleaned_up.set()

    async def consume() -> None:
        async for _ in batched(endless()):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, TIMEOUT)
    assert cleaned_up.is_set()


async def test_closing_early_with_a_full_queue_does_not_hang() -> None:
    cleaned_up = asyncio.Event()

    async def fast() -> AsyncIterator[int]:
        try:
            i = 0
            while True:
                i += 1
                yield i
        finally:
            cleaned_up.set()

    # max_items=1: the internal queue holds 4 items and fills before we read.
    gen = cast(AsyncGenerator[list[int], None], batched(fast(), max_items=1))
    assert await asyncio.wait_for(gen.__anext__(), TIMEOUT) == [1]
    await asyncio.sleep(0.01)
    # Not wait_for/timeout: batched swallows the CancelledError they would use.
    closing = asyncio.create_task(gen.aclose())
    done, _ = await asyncio.wait({closing}, timeout=0.5)
    if not done:
        closing.cancel()  # a second cancel unblocks the reader; clean up
        await asyncio.wait({closing}, timeout=TIMEOUT)
    assert done, "closing the consumer hung"
    assert cleaned_up.is_set()
