"""In-process publish/subscribe for Watch* streams."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Subscription(Generic[T]):
    def __init__(self, size: int) -> None:
        self.queue: asyncio.Queue[T] = asyncio.Queue(size)

    def __aiter__(self) -> AsyncIterator[T]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[T]:
        while True:
            yield await self.queue.get()

    async def get(self) -> T:
        return await self.queue.get()

    def drain(self) -> list[T]:
        """Whatever has arrived, without waiting."""
        items = []
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        return items


class EventBus(Generic[T]):
    def __init__(self, queue_size: int = 1000) -> None:
        self._subscribers: set[Subscription[T]] = set()
        self._queue_size = queue_size

    def publish(self, event: T) -> None:
        for sub in self._subscribers:
            q = sub.queue
            if q.full():  # a slow watcher loses its oldest events, never blocks others
                with contextlib.suppress(asyncio.QueueEmpty):
                    q.get_nowait()
            q.put_nowait(event)

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[Subscription[T]]:
        """Subscribed from entry to exit: read the current state inside, lose nothing."""
        sub: Subscription[T] = Subscription(self._queue_size)
        self._subscribers.add(sub)
        try:
            yield sub
        finally:
            self._subscribers.discard(sub)
