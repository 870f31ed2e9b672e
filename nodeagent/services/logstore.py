"""Per-service log lines: a bounded ring in memory, every line also on disk.

On disk, each service has ``NAME.jsonl`` (records with time and stream, for
history across agent restarts) and ``NAME.stdout.raw`` / ``NAME.stderr.raw``,
byte copies of what was read from the environment, whose sizes are the
offsets to resume tailing from after a restart. A line not yet ended when the
agent stopped is taken up again from the end of its raw file; ``NAME.STREAM.flushed``
holds the raw offset up to which such a line was already made a record (see
:meth:`ServiceLog.flush`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

from providers.base import LogRecord

RING_LINES = 5000  # per service: bounded memory whatever a service prints
STREAMS = ("stdout", "stderr")
_BLOCK = 65536


class ServiceLog:
    def __init__(self, directory: Path, service: str) -> None:
        self.service = service
        self.dir = directory
        self.ring: collections.deque[LogRecord] = collections.deque(maxlen=RING_LINES)
        self._partial = {"stdout": b"", "stderr": b""}
        self._fed = {"stdout": 0, "stderr": 0}  # raw bytes taken into _partial or records
        self._changed = asyncio.Condition()
        self._seq = 0
        self._load()

    def _jsonl(self) -> Path:
        return self.dir / f"{self.service}.jsonl"

    def _raw(self, stream: str) -> Path:
        return self.dir / f"{self.service}.{stream}.raw"

    def _flushed(self, stream: str) -> Path:
        return self.dir / f"{self.service}.{stream}.flushed"

    def _load(self) -> None:
        with contextlib.suppress(FileNotFoundError), self._jsonl().open() as f:
            for line in collections.deque(f, maxlen=RING_LINES):
                with contextlib.suppress(ValueError, KeyError):
                    d = json.loads(line)
                    self.ring.append(LogRecord(d["t"], d["s"], d["x"], self.service))
        for stream in STREAMS:
            self._partial[stream] = self._unfinished_line(stream)
            self._fed[stream] = self.offset(stream)

    def _unfinished_line(self, stream: str) -> bytes:
        """The raw file's bytes after its last newline: counted in the offset, not a record yet."""
        try:
            with self._raw(stream).open("rb") as f:
                end = pos = f.seek(0, 2)
                tail = b""
                while pos > 0 and b"\n" not in tail:
                    step = min(_BLOCK, pos)
                    pos -= step
                    f.seek(pos)
                    tail = f.read(step) + tail
        except FileNotFoundError:
            return b""
        partial = tail.rsplit(b"\n", 1)[-1]
        start = end - len(partial)
        with contextlib.suppress(FileNotFoundError, ValueError):
            flushed = int(self._flushed(stream).read_text())
            if flushed > start:
                partial = partial[flushed - start :]
        return partial

    def offset(self, stream: str) -> int:
        try:
            return self._raw(stream).stat().st_size
        except FileNotFoundError:
            return 0

    def fed(self, stream: str) -> int:
        """Bytes of ``stream`` taken in so far: the offset, once a feed() under way is done."""
        return self._fed[stream]

    async def feed(self, stream: str, data: bytes) -> None:
        """Bytes read from the environment; complete lines become records."""
        await asyncio.to_thread(self._append_raw, stream, data)
        buf = self._partial[stream] + data
        *lines, self._partial[stream] = buf.split(b"\n")
        self._fed[stream] += len(data)
        await self.add([(stream, ln.decode(errors="replace")) for ln in lines])

    async def flush(self) -> None:
        """Make lines not ended by a newline records (the process that printed them is gone)."""
        lines = [
            (s, self._partial[s].decode(errors="replace")) for s in STREAMS if self._partial[s]
        ]
        if not lines:
            return
        marks = {s: self._fed[s] for s in STREAMS if self._partial[s]}
        for stream in marks:
            self._partial[stream] = b""
        for stream, fed in marks.items():
            await asyncio.to_thread(self._flushed(stream).write_text, str(fed))
        await self.add(lines)

    def _append_raw(self, stream: str, data: bytes) -> None:
        with self._raw(stream).open("ab") as f:
            f.write(data)

    def _append_jsonl(self, records: list[LogRecord]) -> None:
        with self._jsonl().open("a") as f:
            for r in records:
                f.write(json.dumps({"t": r.time_unix_nano, "s": r.stream, "x": r.text}) + "\n")

    async def add(self, lines: list[tuple[str, str]]) -> None:
        if not lines:
            return
        now = time.time_ns()
        records = [LogRecord(now, stream, text, self.service) for stream, text in lines]
        await asyncio.to_thread(self._append_jsonl, records)
        async with self._changed:
            self.ring.extend(records)
            self._seq += len(records)
            self._changed.notify_all()

    def last_lines(self, n: int = 10) -> list[str]:
        return [r.text for r in list(self.ring)[-n:]]

    def snapshot(self) -> tuple[int, list[LogRecord]]:
        return self._seq, list(self.ring)

    async def wait_after(self, seq: int) -> tuple[int, list[LogRecord]]:
        """Records added after sequence number ``seq`` (waits for at least one)."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._seq > seq)
            new = self._seq - seq
            items = list(self.ring)[-min(new, len(self.ring)) :]
            return self._seq, items


class LogStore:
    """All service logs of one workspace."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._logs: dict[str, ServiceLog] = {}
        self._added = asyncio.Event()

    def get(self, service: str) -> ServiceLog:
        if service not in self._logs:
            self._logs[service] = ServiceLog(self.dir, service)
            self._added.set()
        return self._logs[service]

    def known(self) -> list[str]:
        names = {p.name.split(".")[0] for p in self.dir.glob("*.jsonl")}
        return sorted(names | set(self._logs))

    async def stream(
        self, services: list[str], *, follow: bool, tail: int | None, since_unix_nano: int
    ) -> AsyncIterator[LogRecord]:
        logs = [self.get(s) for s in services]
        history: list[LogRecord] = []
        seqs = []
        for log in logs:
            seq, items = log.snapshot()
            seqs.append(seq)
            history.extend(r for r in items if r.time_unix_nano >= since_unix_nano)
        history.sort(key=lambda r: r.time_unix_nano)
        if tail:
            history = history[-tail:]
        for r in history:
            yield r
        if not follow:
            return
        queue: asyncio.Queue[LogRecord] = asyncio.Queue(maxsize=10000)

        async def pump(log: ServiceLog, seq: int) -> None:
            while True:
                seq, items = await log.wait_after(seq)
                for r in items:
                    await queue.put(r)

        tasks = [asyncio.create_task(pump(log, seq)) for log, seq in zip(logs, seqs, strict=True)]
        try:
            while True:
                yield await queue.get()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
