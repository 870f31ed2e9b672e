"""In-process publish/subscribe for Watch* streams."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class EventBus(Generic[T]):
    def __init__(self, queue_size: int = 1000) -> None:
        self._subscribers: set[asyncio.Queue[T]] = set()
        self._queue_size = queue_size

    def publish(self, event: T) -> None:
        for q in self._subscribers:
            if q.full():  # a slow watcher loses its oldest events, never blocks others
                with contextlib.suppress(asyncio.QueueEmpty):
                    q.get_nowait()
            q.put_nowait(event)

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[AsyncIterator[T]]:
        """Subscribed from entry to exit: read the current state inside, lose nothing."""
        q: asyncio.Queue[T] = asyncio.Queue(self._queue_size)
        self._subscribers.add(q)

        async def events() -> AsyncIterator[T]:
            while True:
                yield await q.get()

        try:
            yield events()
        finally:
            self._subscribers.discard(q)
