"""Blocking streams read in daemon threads, fed to asyncio.

The engines' SDKs read output (logs, exec streams, terminals) with blocking
socket reads. Each stream gets its own daemon thread (never an executor slot:
a followed log can last for days and would starve every other
``asyncio.to_thread`` call) that hands what it reads to the event loop through
a bounded buffer. Closing the async side unblocks the read (a socket
shutdown), so nothing is left behind when the consumer cancels.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import queue
import threading
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
)
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
C = TypeVar("C")

Closer = Callable[[], None]
Opener = Callable[[], tuple[Iterable[T], Closer]]


@dataclass(frozen=True)
class _Item(Generic[T]):
    value: T


@dataclass(frozen=True)
class _Failed:
    error: Exception


@dataclass(frozen=True)
class _End:
    pass


class ThreadedStream(Generic[T]):
    """An async iterator over a blocking stream that a daemon thread (named ``name``) reads.

    ``open_stream`` runs in the thread (opening blocks too) and returns the items
    to iterate and a ``close`` callable that unblocks a read in progress (e.g. a
    socket shutdown). Errors of the thread are re-raised by ``__anext__`` as
    ``on_error(exc)``, chained. Always ``await aclose()`` (in a ``finally``).

    At most ``maxsize`` items wait for the consumer: then the thread waits too,
    so a slow consumer slows the read instead of filling memory.
    """

    def __init__(
        self,
        name: str,
        open_stream: Opener[T],
        on_error: Callable[[Exception], Exception],
        *,
        maxsize: int = 256,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._open = open_stream
        self._on_error = on_error
        # Filled by the thread, drained by the loop (deque appends/pops are thread-safe);
        # _ready wakes the consumer, _room holds the thread back when the consumer lags.
        self._buffer: collections.deque[_Item[T] | _Failed | _End] = collections.deque()
        self._ready = asyncio.Event()
        self._wake_pending = False  # a _wake is scheduled on the loop: no need for another
        self._room = threading.Semaphore(maxsize)
        self._lock = threading.Lock()
        self._stopping = False
        self._closer: Closer | None = None
        self._done = False
        self._finished = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- reader thread ---------------------------------------------------------

    def _run(self) -> None:
        try:
            self._read()
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                self._loop.call_soon_threadsafe(self._finished.set)

    def _read(self) -> None:
        try:
            items, closer = self._open()
        except Exception as exc:
            self._put(_Failed(exc))
            return
        with self._lock:
            stopping = self._stopping
            self._closer = closer
        try:
            if stopping:
                return
            for item in items:
                if not self._put(_Item(item)):
                    return
        except Exception as exc:
            if not self._is_stopping():
                self._put(_Failed(exc))
            return
        finally:
            self._close_stream()
        self._put(_End())

    def _is_stopping(self) -> bool:
        with self._lock:
            return self._stopping

    def _put(self, event: _Item[T] | _Failed | _End) -> bool:
        """Hand ``event`` to the loop, waiting while the consumer lags; False once stopped."""
        while not self._room.acquire(timeout=0.25):
            if self._is_stopping() or self._loop.is_closed():
                return False
        if self._is_stopping():
            return False
        self._buffer.append(event)
        if not self._wake_pending:
            self._wake_pending = True
            try:
                self._loop.call_soon_threadsafe(self._wake)
            except RuntimeError:  # the loop is closed
                return False
        return True

    def _close_stream(self) -> None:
        with self._lock:
            closer, self._closer = self._closer, None
        if closer is not None:
            try:
                closer()
            except Exception as exc:  # closing is best effort; the read ends anyway
                log.debug("closing %s: %r", self._thread.name, exc)

    # -- event loop side -------------------------------------------------------

    def _wake(self) -> None:
        # Reset before waking: whatever the thread appends from now on schedules a new wake.
        self._wake_pending = False
        self._ready.set()

    def __aiter__(self) -> ThreadedStream[T]:
        return self

    async def __anext__(self) -> T:
        if self._done:
            raise StopAsyncIteration
        while not self._buffer:
            self._ready.clear()
            if self._buffer:  # appended between the check and the clear
                break
            await self._ready.wait()
        event = self._buffer.popleft()
        self._room.release()
        if isinstance(event, _Item):
            return event.value
        self._done = True
        if isinstance(event, _Failed):
            raise self._on_error(event.error) from event.error
        raise StopAsyncIteration

    async def aclose(self, grace: float = 5.0) -> None:
        """Stop the reader: close its stream, then wait (up to ``grace``) for the thread."""
        with self._lock:
            self._stopping = True
        self._done = True
        self._close_stream()
        self._buffer.clear()
        self._room.release()  # wake a reader waiting for room: it sees the stop
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self._finished.wait()
        # The thread has returned from its target; joining only lets it exit (microseconds).
        self._thread.join(timeout=0.1)
        if self._thread.is_alive():
            log.warning("reader thread %s did not stop within %.1fs", self._thread.name, grace)

    @property
    def thread(self) -> threading.Thread:
        return self._thread


async def merge(named: Mapping[str, AsyncIterator[T]]) -> AsyncGenerator[tuple[str, T], None]:
    """(name, item) from several async iterators, as each has one; ends when all have.

    An iterator's error ends the merge with that error.
    """
    pending: dict[asyncio.Future[T], tuple[str, AsyncIterator[T]]] = {
        asyncio.ensure_future(anext(it)): (name, it) for name, it in named.items()
    }
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                name, it = pending.pop(future)
                try:
                    item = future.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(it))] = (name, it)
                yield name, item
    finally:
        for future in pending:
            future.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


class ThreadedWriter:
    """Writes to a blocking sink (a session's stdin) in a daemon thread of its own.

    A command that stops reading its input blocks that thread only: never the event
    loop, nor an executor slot every other ``asyncio.to_thread`` call needs. At most
    ``maxsize`` writes wait; then ``write`` waits too. Once a send fails (the command
    has gone) the rest is dropped: the output's end says what happened.
    """

    def __init__(
        self,
        name: str,
        send: Callable[[bytes], object],
        finish: Callable[[], object] | None = None,
        *,
        maxsize: int = 64,
    ) -> None:
        self._name = name
        self._send = send
        self._finish = finish
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._room = asyncio.Semaphore(maxsize)
        self._loop: asyncio.AbstractEventLoop | None = None  # set by the first write
        self._closed = False

    def _run(self) -> None:
        failed = False
        while (data := self._queue.get()) is not None:
            if not failed:
                try:
                    self._send(data)
                except Exception as exc:
                    failed = True
                    log.debug(
                        "%s: %r; dropping further input", threading.current_thread().name, exc
                    )
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                assert self._loop is not None
                self._loop.call_soon_threadsafe(self._room.release)
        if not failed:
            self._run_finish()

    def _run_finish(self) -> None:
        if self._finish is not None:
            try:
                self._finish()
            except Exception as exc:
                log.debug("finishing %s: %r", self._name, exc)

    async def write(self, data: bytes) -> None:
        if self._closed:
            return
        if self._loop is None:  # the thread starts with the first write
            self._loop = asyncio.get_running_loop()
            threading.Thread(target=self._run, name=self._name, daemon=True).start()
        await self._room.acquire()
        self._queue.put(data)

    def close(self) -> None:
        """No more writes: ``finish`` runs once what is queued has been sent (at once
        if nothing was written); idempotent, from any thread."""
        if self._closed:
            return
        self._closed = True
        if self._loop is None:
            self._run_finish()
        else:
            self._queue.put(None)


class EngineClient(Generic[C]):
    """The one thread seam of a provider: its SDK client, made on first use (and made
    again when ``alive`` says it died), and every blocking SDK call run in a thread
    with the engine's error translation around it.

    ``errors(action)`` is the engine's seam from SDK errors to ``common.errors``;
    connection failures are not cached, so an engine started later is found.
    """

    def __init__(
        self,
        connect: Callable[[], C],
        errors: Callable[[str], AbstractContextManager[object]],
        *,
        alive: Callable[[C], bool] | None = None,
        close: Callable[[C], object] | None = None,
    ) -> None:
        self._connect = connect
        self._errors = errors
        self._alive = alive
        self._close = close
        self._client: C | None = None
        self._lock = threading.Lock()

    def client_sync(self) -> C:
        """The client, connecting if needed. Blocking: call it in a thread."""
        with self._lock:
            client = self._client
            if client is not None and (self._alive is None or self._alive(client)):
                return client
            self._client = None
            if client is not None and self._close is not None:
                with contextlib.suppress(Exception):
                    self._close(client)
            with self._errors("connecting"):
                client = self._connect()
            self._client = client
            return client

    def call_sync(self, action: str, fn: Callable[[C], T]) -> T:
        """``fn(client)`` with SDK errors translated. Blocking: call it in a thread."""
        client = self.client_sync()
        with self._errors(action):
            return fn(client)

    async def call(self, action: str, fn: Callable[[C], T]) -> T:
        """``fn(client)`` in a thread; SDK errors come out as ``common.errors``."""
        return await asyncio.to_thread(self.call_sync, action, fn)

    async def client(self) -> C:
        return await asyncio.to_thread(self.client_sync)

    async def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None and self._close is not None:
            await asyncio.to_thread(self._close, client)


_abandoned: set[asyncio.Future[Any]] = set()


async def open_or_abandon(
    opening: Callable[[], Awaitable[T]], abandon: Callable[[T], Awaitable[object] | None]
) -> T:
    """Await ``opening()`` so that a caller cancelled meanwhile leaves nothing open.

    Opening a session (a terminal, a shell) cannot be interrupted half way: it runs
    shielded, and if the caller is cancelled first, ``abandon`` gets what it opened
    (to hang it up) as soon as it is open. Failures after a cancel are dropped.
    """
    task: asyncio.Future[T] = asyncio.ensure_future(opening())
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:

        def hang_up(done: asyncio.Future[T]) -> None:
            if done.cancelled() or done.exception() is not None:
                return
            closing = abandon(done.result())
            if closing is not None:
                follow_up = asyncio.ensure_future(closing)
                _abandoned.add(follow_up)
                follow_up.add_done_callback(_abandoned.discard)

        task.add_done_callback(hang_up)
        raise
