"""Streaming helpers: blocking docker-py streams read in threads, fed to asyncio.

Docker's log and exec streams are blocking socket reads. Each one gets its own
daemon thread (never an executor slot: a followed log can last for days and
would starve every other ``asyncio.to_thread`` call) that hands what it reads
to the event loop through a bounded buffer. Closing the async side shuts the
socket down, so the thread blocked in ``recv`` returns at once; nothing is
left behind when the consumer cancels.
"""

from __future__ import annotations

import asyncio
import calendar
import collections
import contextlib
import functools
import logging
import re
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import docker.errors
import docker.types
import requests.exceptions
from docker.utils.socket import frames_iter

from providers.base import LogRecord

log = logging.getLogger(__name__)

T = TypeVar("T")

# Stream ids of Docker's multiplexed stream format (the first byte of each frame header).
STDOUT = 1
STDERR = 2

_FRAME_HEADER = struct.Struct(">BxxxL")

# Every reader thread of this module has a name starting with this, so tests
# (and operators looking at a thread dump) can find them.
THREAD_PREFIX = "vendetta-docker-"

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
    """An async iterator over a blocking stream that a daemon thread reads.

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
        self._thread = threading.Thread(target=self._run, name=THREAD_PREFIX + name, daemon=True)
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


# -- sockets --------------------------------------------------------------------


def shutdown_socket(sock: Any) -> None:
    """Unblock a thread reading ``sock`` (from ``exec_start(socket=True)``), then close it all.

    ``close()`` alone does not wake a thread blocked in ``recv``; ``shutdown`` does.
    For a unix socket docker-py returns a ``socket.SocketIO`` whose ``_sock`` is
    the socket, and hangs the HTTP response on it as ``_response`` (the same
    attributes docker-py's own ``CancellableStream.close`` relies on).
    """
    raw = getattr(sock, "_sock", sock)
    with contextlib.suppress(OSError, AttributeError):
        raw.shutdown(socket.SHUT_RDWR)
    for part in (getattr(sock, "_response", None), sock, raw):
        if part is not None:
            with contextlib.suppress(Exception):
                part.close()


def exec_frames(sock: Any) -> Iterator[tuple[int, bytes]]:
    """(stream id, bytes) frames of a non-tty exec socket, until the command's output ends."""
    for stream_id, data in frames_iter(sock, False):
        yield int(stream_id), bytes(data)


# -- logs -----------------------------------------------------------------------


def _raise_for_status(response: Any) -> None:
    try:
        response.raise_for_status()
    except requests.exceptions.HTTPError as exc:
        response.close()
        # Raises docker.errors.NotFound/APIError with the daemon's explanation.
        docker.errors.create_api_error_from_http_exception(exc)
        raise


def _read_exactly(raw: Any, size: int) -> bytes | None:
    buf = b""
    while len(buf) < size:
        chunk = raw.read(size - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def _log_frames(response: Any, *, follow: bool) -> Iterator[list[tuple[int, bytes]]]:
    """Frames of Docker's multiplexed stream (8-byte header: stream id, length; then data).

    Yields them in batches, everything complete in one read, so a busy log
    costs one hand-over to the event loop per read rather than per line. A
    finite log is read in large blocks; a followed one with ``read1`` (what
    has arrived, so a new line is passed on at once), which with Docker's
    chunked answers means about one line per read.
    """
    raw = response.raw
    read_some = getattr(raw, "read1", None) if follow else raw.read
    if read_some is None:  # urllib3 < 2 has no read1: read each frame exactly
        while True:
            header = _read_exactly(raw, _FRAME_HEADER.size)
            data = None if header is None else _read_exactly(raw, _FRAME_HEADER.unpack(header)[1])
            if header is None or data is None:
                return
            yield [(_FRAME_HEADER.unpack(header)[0], data)]
    buf = bytearray()
    while True:
        chunk = read_some(65536)
        if not chunk:
            return
        buf += chunk
        pos = 0
        batch: list[tuple[int, bytes]] = []
        while len(buf) - pos >= _FRAME_HEADER.size:
            stream_id, length = _FRAME_HEADER.unpack_from(buf, pos)
            end = pos + _FRAME_HEADER.size + length
            if end > len(buf):
                break
            batch.append((stream_id, bytes(buf[pos + _FRAME_HEADER.size : end])))
            pos = end
        del buf[:pos]
        if batch:
            yield batch


def _record_batches(frames: Iterator[list[tuple[int, bytes]]]) -> Iterator[list[LogRecord]]:
    last_time = 0
    for batch in frames:
        records: list[LogRecord] = []
        for stream_id, data in batch:
            if stream_id not in (STDOUT, STDERR):
                continue  # stdin (never attached for our containers)
            name = "stderr" if stream_id == STDERR else "stdout"
            for record in log_records(data, name, last_time):
                last_time = record.time_unix_nano
                records.append(record)
        if records:
            yield records


def open_log_records(
    api: Any, container_id: str, *, follow: bool, tail: int | None, since_unix_nano: int
) -> tuple[Iterator[list[LogRecord]], Closer]:
    """Open one logs request for stdout *and* stderr: batches of records, in log order.

    One multiplexed request (rather than one per stream) keeps Docker's own
    order and makes ``tail`` count lines of both streams together. docker-py's
    ``logs()`` drops the stream id of each frame, so the request is made with
    the client's public requests API and the frames are read here; closing
    goes through docker-py's ``CancellableStream``. Blocking: call in a thread.
    """
    params: dict[str, str | int] = {
        "stdout": 1,
        "stderr": 1,
        "timestamps": 1,
        "follow": 1 if follow else 0,
        "tail": "all" if tail is None else tail,
    }
    if since_unix_nano > 0:
        seconds, nanos = divmod(since_unix_nano, 1_000_000_000)
        params["since"] = f"{seconds}.{nanos:09d}"
    url = f"{api.base_url}/v{api.api_version}/containers/{container_id}/logs"
    # timeout=None: a followed log may be silent for hours.
    response = api.get(url, params=params, stream=True, timeout=None)
    _raise_for_status(response)
    cancellable = docker.types.CancellableStream(iter(()), response)
    return _record_batches(_log_frames(response, follow=follow)), cancellable.close


_TIMESTAMP = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)(?: |$)")


@functools.lru_cache(maxsize=64)
def _epoch_seconds(head: str, zone: str) -> int:
    """Seconds since the epoch of "YYYY-MM-DDTHH:MM:SS" in ``zone`` (cached: lines share it)."""
    seconds = calendar.timegm(
        (int(head[0:4]), int(head[5:7]), int(head[8:10]), int(head[11:13]), int(head[14:16]),
         int(head[17:19]), 0, 0, 0)
    )  # fmt: skip
    if zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        seconds -= sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    return seconds


def parse_timestamp(text: str) -> tuple[int, str] | None:
    """Split Docker's RFC3339Nano prefix off ``text``: (unix nanoseconds, rest) or None."""
    match = _TIMESTAMP.match(text)
    if match is None:
        return None
    head, fraction, zone = match.group(1, 2, 3)
    nanos = int(fraction.ljust(9, "0")) if fraction else 0
    return _epoch_seconds(head, zone) * 1_000_000_000 + nanos, text[match.end() :]


def log_records(data: bytes, stream: str, last_time_unix_nano: int) -> list[LogRecord]:
    """The records in one log frame (one message: "TIMESTAMP text\\n"), newline stripped.

    A line without a timestamp (not expected from Docker) gets the previous time.
    """
    text = data.decode("utf-8", "replace")
    if text.endswith("\n"):
        text = text[:-1]
    if text.endswith("\r"):
        text = text[:-1]
    records: list[LogRecord] = []
    for line in text.split("\n"):
        parsed = parse_timestamp(line)
        if parsed is None:
            records.append(LogRecord(last_time_unix_nano, stream, line))
            continue
        last_time_unix_nano, body = parsed
        records.append(LogRecord(last_time_unix_nano, stream, body.removesuffix("\r")))
    return records
