"""Per-service logs: line assembly, the bounded ring, persistence, merged streams."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from nodeagent.services import logstore
from nodeagent.services.logstore import LogStore, ServiceLog
from providers.base import LogRecord


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> itertools.count[int]:
    """time.time_ns() as seen by the log store: 1000, 2000, ... one tick per add()."""
    ticks = itertools.count(1000, 1000)
    monkeypatch.setattr(logstore, "time", SimpleNamespace(time_ns=lambda: next(ticks)))
    return ticks


def lines(records: list[LogRecord]) -> list[tuple[str, str]]:
    return [(r.stream, r.text) for r in records]


async def drain(it: AsyncIterator[LogRecord]) -> list[LogRecord]:
    async with asyncio.timeout(5):
        return [r async for r in it]


async def test_feed_joins_lines_split_across_chunks_per_stream(tmp_path: Path) -> None:
    log = ServiceLog(tmp_path, "web")
    await log.feed("stdout", b"hel")
    await log.feed("stderr", b"warn")
    await log.feed("stdout", b"lo\nwor")
    await log.feed("stderr", b"ing: x\n\n")
    await log.feed("stdout", b"ld\nnot yet")
    _, records = log.snapshot()
    assert lines(records) == [
        ("stdout", "hello"),
        ("stderr", "warning: x"),
        ("stderr", ""),
        ("stdout", "world"),
    ]
    assert all(r.service == "web" for r in records)
    assert log.last_lines(2) == ["", "world"]
    # The position counts every byte read, the line not ended yet included.
    assert json.loads((tmp_path / "web.stdout.pos").read_text()) == {
        "fed": len(b"hello\nworld\nnot yet"),
        "partial": b"not yet".hex(),
    }
    assert log.offset("stdout") == len(b"hello\nworld\nnot yet")
    assert log.offset("stderr") == len(b"warning: x\n\n")


async def test_a_line_without_end_is_cut_into_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logstore, "LINE_MAX", 10)
    log = ServiceLog(tmp_path, "bar")
    for _ in range(5):
        await log.feed("stdout", b"\r#####")  # a progress bar: never a newline
    assert log.last_lines() == ["\r#####\r#####", "\r#####\r#####"]
    assert len(json.loads((tmp_path / "bar.stdout.pos").read_text())["partial"]) == 12


async def test_feed_decodes_invalid_utf8(tmp_path: Path) -> None:
    log = ServiceLog(tmp_path, "bin")
    await log.feed("stdout", "é".encode()[:1] + b"\n")
    assert log.last_lines() == ["\ufffd"]


async def test_ring_is_bounded_but_disk_keeps_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logstore, "RING_LINES", 3)
    log = ServiceLog(tmp_path, "chatty")
    await log.feed("stdout", b"".join(b"line %d\n" % i for i in range(5)))
    assert log.last_lines(10) == ["line 2", "line 3", "line 4"]
    assert len((tmp_path / "chatty.jsonl").read_text().splitlines()) == 5
    # Reloading keeps the bound, and the newest lines.
    again = ServiceLog(tmp_path, "chatty")
    assert again.last_lines(10) == ["line 2", "line 3", "line 4"]
    seq, _ = again.snapshot()
    await again.add([("stdout", "line 5")])
    _, new = await again.wait_after(seq)
    assert lines(new) == [("stdout", "line 5")]
    assert again.last_lines(10) == ["line 3", "line 4", "line 5"]


async def test_records_and_offsets_survive_a_new_store(tmp_path: Path, clock: object) -> None:
    store = LogStore(tmp_path / "logs")
    await store.get("db").feed("stdout", b"ready\n")
    await store.get("db").feed("stderr", b"slow query\n")
    await store.get("web").feed("stdout", b"GET /\npartial")
    before = {n: store.get(n).snapshot()[1] for n in ("db", "web")}

    again = LogStore(tmp_path / "logs")
    assert again.known() == ["db", "web"]
    for name in ("db", "web"):
        assert again.get(name).snapshot()[1] == before[name]
    assert again.get("db").offset("stdout") == len(b"ready\n")
    assert again.get("db").offset("stderr") == len(b"slow query\n")
    assert again.get("web").offset("stdout") == len(b"GET /\npartial")
    assert again.get("web").offset("stderr") == 0
    # A corrupt line in the history is skipped, not fatal.
    with (tmp_path / "logs" / "db.jsonl").open("a") as f:
        f.write("{not json\n" + json.dumps({"t": 1}) + "\n")
    assert [r.text for r in ServiceLog(tmp_path / "logs", "db").snapshot()[1]] == [
        "ready",
        "slow query",
    ]


async def test_partial_line_survives_a_restart(tmp_path: Path) -> None:
    await ServiceLog(tmp_path, "web").feed("stdout", b"GET /in")
    again = ServiceLog(tmp_path, "web")
    offset = again.offset("stdout")  # where the resumed tail starts
    await again.feed("stdout", b"dex 200\n"[offset - len(b"GET /in") :])
    assert again.last_lines() == ["GET /index 200"]


async def test_flush_ends_unterminated_lines_once(tmp_path: Path) -> None:
    log = ServiceLog(tmp_path, "job")
    await log.feed("stdout", b"done\nbye")
    await log.feed("stderr", b"warn")
    await log.flush()
    assert lines(log.snapshot()[1]) == [("stdout", "done"), ("stdout", "bye"), ("stderr", "warn")]
    await log.flush()  # nothing left
    assert len(log.snapshot()[1]) == 3
    # What follows starts a new line, also when an agent restart comes in between.
    await log.feed("stdout", b"nex")
    again = ServiceLog(tmp_path, "job")
    await again.feed("stdout", b"t\n")
    await again.feed("stderr", b"more\n")
    assert again.last_lines() == ["done", "bye", "warn", "next", "more"]
    assert again.offset("stdout") == len(b"done\nbyenext\n")


async def test_history_is_rotated_and_still_fills_the_ring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logstore, "JSONL_MAX", 200)
    monkeypatch.setattr(logstore, "RING_LINES", 50)
    log = ServiceLog(tmp_path, "chatty")
    for i in range(42):
        await log.feed("stdout", b"line %02d\n" % i)
    # Two generations at most, each about JSONL_MAX: the disk stays bounded.
    current, previous = tmp_path / "chatty.jsonl", tmp_path / "chatty.jsonl.1"
    assert {p.name for p in tmp_path.glob("chatty.jsonl*")} == {current.name, previous.name}
    assert all(p.stat().st_size <= 200 + 60 for p in (current, previous))
    # A new agent fills its ring from both, oldest first.
    kept = len(previous.read_text().splitlines()) + len(current.read_text().splitlines())
    assert kept > len(current.read_text().splitlines())
    again = ServiceLog(tmp_path, "chatty")
    assert again.last_lines(50) == [f"line {i:02d}" for i in range(42 - kept, 42)]
    assert LogStore(tmp_path).known() == ["chatty"]


async def test_the_position_of_an_earlier_agent_is_taken_over(tmp_path: Path) -> None:
    """Earlier agents kept a byte copy of the output; its size was the position."""
    (tmp_path / "db.stdout.raw").write_bytes(b"ready\nhalf")
    (tmp_path / "db.stdout.flushed").write_text("10")
    log = ServiceLog(tmp_path, "db")
    assert (log.offset("stdout"), log.offset("stderr")) == (10, 0)
    assert not list(tmp_path.glob("db.stdout.raw")) and not list(tmp_path.glob("*.flushed"))
    assert ServiceLog(tmp_path, "db").offset("stdout") == 10


async def test_known_lists_services_on_disk_and_in_memory(tmp_path: Path) -> None:
    store = LogStore(tmp_path)
    await store.get("b").add([("stdout", "x")])
    store.get("a")  # nothing written yet
    assert store.known() == ["a", "b"]
    assert LogStore(tmp_path).known() == ["b"]


async def test_stream_tail_across_services_sorted_by_time(tmp_path: Path, clock: object) -> None:
    store = LogStore(tmp_path)
    db, web = store.get("db"), store.get("web")
    await db.add([("stdout", "db 1")])  # t=1000
    await web.add([("stdout", "web 1")])  # t=2000
    await db.add([("stderr", "db 2"), ("stdout", "db 3")])  # t=3000, both
    await web.add([("stdout", "web 2")])  # t=4000

    everything = await drain(
        store.stream(["web", "db"], follow=False, tail=None, since_unix_nano=0)
    )
    assert [r.text for r in everything] == ["db 1", "web 1", "db 2", "db 3", "web 2"]
    assert [r.service for r in everything] == ["db", "web", "db", "db", "web"]
    assert [r.time_unix_nano for r in everything] == [1000, 2000, 3000, 3000, 4000]

    last3 = await drain(store.stream(["db", "web"], follow=False, tail=3, since_unix_nano=0))
    assert [r.text for r in last3] == ["db 2", "db 3", "web 2"]
    many = await drain(store.stream(["db", "web"], follow=False, tail=100, since_unix_nano=0))
    assert len(many) == 5
    only_web = await drain(store.stream(["web"], follow=False, tail=1, since_unix_nano=0))
    assert [r.text for r in only_web] == ["web 2"]


async def test_stream_since(tmp_path: Path, clock: object) -> None:
    store = LogStore(tmp_path)
    for i in range(4):  # t = 1000 .. 4000
        await store.get("s").add([("stdout", f"l{i}")])
    got = await drain(store.stream(["s"], follow=False, tail=None, since_unix_nano=3000))
    assert [r.text for r in got] == ["l2", "l3"]
    got = await drain(store.stream(["s"], follow=False, tail=1, since_unix_nano=2000))
    assert [r.text for r in got] == ["l3"]
    assert await drain(store.stream(["s"], follow=False, tail=None, since_unix_nano=5000)) == []


async def test_follow_yields_lines_added_later(tmp_path: Path) -> None:
    store = LogStore(tmp_path)
    await store.get("db").add([("stdout", "old")])
    it = store.stream(["db", "web"], follow=True, tail=None, since_unix_nano=0)
    try:
        async with asyncio.timeout(5):
            first = await anext(it)
            assert first.text == "old"
            # Nothing more yet: the stream waits rather than ending.
            pending = asyncio.ensure_future(anext(it))
            await asyncio.sleep(0.05)
            assert not pending.done()
            await store.get("web").feed("stdout", b"new li")
            await asyncio.sleep(0.02)
            assert not pending.done()  # not a whole line yet
            await store.get("web").feed("stdout", b"ne\n")
            rec = await pending
            assert (rec.service, rec.stream, rec.text) == ("web", "stdout", "new line")
            await store.get("db").add([("stderr", "a"), ("stderr", "b")])
            assert [(await anext(it)).text for _ in range(2)] == ["a", "b"]
    finally:
        await it.aclose()  # type: ignore[attr-defined]


async def test_a_feed_cut_short_by_shutdown_still_saves_its_position(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent closing mid-feed must not leave records without their position:
    the next agent would read those lines again (seen in CI as a doubled line)."""
    save = ServiceLog._save_pos

    def slow_save(self: ServiceLog, stream: str, fed: int, partial: bytes) -> None:
        time.sleep(0.2)  # the window between the records and their position
        save(self, stream, fed, partial)

    monkeypatch.setattr(ServiceLog, "_save_pos", slow_save)
    log = ServiceLog(tmp_path, "db")
    tail = asyncio.create_task(log.feed("stdout", b"db ready\n"))
    await log.wait_after(0)  # the record is in; its position is being saved
    tail.cancel()  # what Supervisor.close() does to every tail
    await asyncio.gather(tail, return_exceptions=True)
    await log.settle()
    again = ServiceLog(tmp_path, "db")
    assert again.offset("stdout") == len(b"db ready\n")
    assert again.last_lines() == ["db ready"]
