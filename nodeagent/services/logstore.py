"""Per-service log lines: a bounded ring in memory, the newest lines also on disk.

On disk, each service has ``NAME.jsonl`` (records with time and stream, to
fill the ring again after an agent restart), rotated to ``NAME.jsonl.1`` past
``JSONL_MAX`` bytes, so a chatty service costs at most twice that. Per output
stream, ``NAME.STREAM.pos`` says how many bytes of the environment's output
file were taken in, and the line not yet ended among them: where a restarted
agent's tail starts again. Records are written before the position, so a crash
between the two repeats lines rather than losing them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from common.paths import private_file, write_private
from providers.base import LogRecord

RING_LINES = 5000  # per service: bounded memory whatever a service prints
JSONL_MAX = 8 * 1024 * 1024  # then rotate: several times RING_LINES of ordinary lines
LINE_MAX = 64 * 1024  # a longer line (progress bars, binary output) is cut into records
STREAMS = ("stdout", "stderr")


class ServiceLog:
    def __init__(self, directory: Path, service: str) -> None:
        self.service = service
        self.dir = directory
        self.ring: collections.deque[LogRecord] = collections.deque(maxlen=RING_LINES)
        self._partial = {"stdout": b"", "stderr": b""}
        self._fed = {"stdout": 0, "stderr": 0}  # output bytes taken into _partial or records
        self._changed = asyncio.Condition()
        self._seq = 0
        # One feed or flush at a time: records keep the order of the output.
        self._writing = asyncio.Lock()
        self._inflight: set[asyncio.Task[None]] = set()
        self._load()

    def _jsonl(self, generation: str = "") -> Path:
        return self.dir / f"{self.service}.jsonl{generation}"

    def _pos(self, stream: str) -> Path:
        return self.dir / f"{self.service}.{stream}.pos"

    def _history(self) -> Iterator[str]:
        for path in (self._jsonl(".1"), self._jsonl()):
            with contextlib.suppress(FileNotFoundError), path.open() as f:
                yield from f

    def _load(self) -> None:
        for line in collections.deque(self._history(), maxlen=RING_LINES):
            with contextlib.suppress(ValueError, KeyError):
                d = json.loads(line)
                self.ring.append(LogRecord(d["t"], d["s"], d["x"], self.service))
        for stream in STREAMS:
            with contextlib.suppress(FileNotFoundError, ValueError, KeyError, TypeError):
                pos = json.loads(self._pos(stream).read_text())
                self._fed[stream] = int(pos["fed"])
                self._partial[stream] = bytes.fromhex(pos["partial"])
                continue
            self._migrate(stream)

    def _migrate(self, stream: str) -> None:
        """Earlier agents kept a byte copy of the output (``.raw``): its size is the position."""
        raw = self.dir / f"{self.service}.{stream}.raw"
        with contextlib.suppress(FileNotFoundError):
            self._fed[stream] = raw.stat().st_size
            self._save_pos(stream, self._fed[stream], b"")
            raw.unlink()
            (self.dir / f"{self.service}.{stream}.flushed").unlink(missing_ok=True)

    def _save_pos(self, stream: str, fed: int, partial: bytes) -> None:
        path = self._pos(stream)
        tmp = path.with_suffix(".tmp")
        write_private(tmp, json.dumps({"fed": fed, "partial": partial.hex()}))
        os.replace(tmp, path)

    def offset(self, stream: str) -> int:
        """Bytes of ``stream`` taken in so far: where following its output goes on."""
        return self._fed[stream]

    async def feed(self, stream: str, data: bytes) -> None:
        """Bytes read from the environment; complete lines become records.

        A feed runs to its end even when its tail is cancelled (the agent shutting
        down): records saved without their position would be read again next time.
        """
        task = asyncio.ensure_future(self._feed(stream, data))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        await asyncio.shield(task)

    async def settle(self) -> None:
        """Wait for feeds still running after their tail was cancelled."""
        await asyncio.gather(*self._inflight, return_exceptions=True)

    async def _feed(self, stream: str, data: bytes) -> None:
        async with self._writing:
            buf = self._partial[stream] + data
            *lines, self._partial[stream] = buf.split(b"\n")
            if len(self._partial[stream]) > LINE_MAX:  # no newline coming: a record anyway
                lines.append(self._partial[stream])
                self._partial[stream] = b""
            self._fed[stream] += len(data)
            await self.add([(stream, ln.decode(errors="replace")) for ln in lines])
            partial = self._partial[stream]
            await asyncio.to_thread(self._save_pos, stream, self._fed[stream], partial)

    async def flush(self) -> None:
        """Make lines not ended by a newline records (the process that printed them is gone)."""
        async with self._writing:
            ended = [s for s in STREAMS if self._partial[s]]
            lines = [(s, self._partial[s].decode(errors="replace")) for s in ended]
            for stream in ended:
                self._partial[stream] = b""
            await self.add(lines)
            for stream in ended:
                await asyncio.to_thread(self._save_pos, stream, self._fed[stream], b"")

    def _append_jsonl(self, records: list[LogRecord]) -> None:
        path = self._jsonl()
        with private_file(path, "a") as f:
            for r in records:
                f.write(json.dumps({"t": r.time_unix_nano, "s": r.stream, "x": r.text}) + "\n")
            full = f.tell() > JSONL_MAX
        if full:
            os.replace(path, self._jsonl(".1"))

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
        names = {p.name.split(".jsonl")[0] for p in self.dir.glob("*.jsonl*")}
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
