"""Commands with stdin in QEMU guests: the node's end of the stream multiplexer.

The guest agent gives a command no input and its output only at the end, so
``pipe`` (what sftp-server, scp, rsync, git and the forwarding relays need)
runs over a virtio-serial port of the domain instead (``org.vendetta.mux``,
reached through libvirt: channel.py). One connection per guest carries every
such command; ``guest_mux.py`` is its other end, started in the guest by the
guest agent for each connection.
The wire (frames, marks, credit) is described there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path

from common.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    UnavailableError,
)
from providers.base import ExecChunk, Terminal
from providers.qemu import guest_mux as wire

# The program the guest runs: this file's sibling, as its source text.
GUEST_SOURCE = Path(wire.__file__).read_text()
# Until the guest's end answers: python3 starting in a TCG guest under load is slow.
READY_SECONDS = 30.0
# Until the guest's end answers an OPEN: longer means it is gone (killed inside).
OPEN_SECONDS = 20.0
# Give credit back once this much output has been taken (fewer, larger frames).
CREDIT_BATCH = wire.WINDOW // 4

# Starts the guest's end with this token; returns an awaitable that ends (with
# the program's exit code and stderr) only if the program does.
Starter = Callable[[Sequence[str]], Awaitable[Callable[[], Awaitable[tuple[int, bytes] | None]]]]


# A guest without python3 (an image of the user's) is told apart by this exit code.
NO_PYTHON = 127


def guest_command(token: str) -> list[str]:
    return [
        "/bin/sh", "-c", f'command -v python3 >/dev/null || exit {NO_PYTHON}; exec python3 -c "$@"',
        "sh", GUEST_SOURCE, token,
    ]  # fmt: skip


class Closed(Exception):
    """The connection to the guest ended."""


class Stalled(UnavailableError):
    """The guest's end did not answer: it was killed or stopped inside the guest."""


class NoPython(FailedPreconditionError):
    """The guest has no python3 to run its end with."""


class MuxStream(Terminal):
    """One command in the guest, with stdin, on a multiplexer connection."""

    def __init__(self, mux: GuestMux, sid: int) -> None:
        self._mux, self._sid = mux, sid
        self._chunks: asyncio.Queue[ExecChunk | Closed] = asyncio.Queue()
        self._credit = wire.WINDOW  # what the guest will still take as stdin
        self._credit_changed = asyncio.Event()
        self._taken = 0  # output taken, not yet given back as credit
        self._owed = 0  # output received, not yet given back: at most a window
        self.answered = asyncio.Event()  # a first frame came: the guest's end runs it
        self.exited = False

    # -- from the connection ---------------------------------------------------

    def deliver(self, kind: int, payload: bytes) -> None:
        """One frame from the guest. Raises Closed where the guest broke the wire."""
        self.answered.set()
        if kind in (wire.OUT, wire.ERR):
            self._owed += len(payload)
            if self._owed > wire.WINDOW:  # the node's memory is not the guest's to fill
                raise Closed(
                    f"the stream relay in workspace {self._mux.name!r} sent past its window"
                )
        if kind == wire.OUT:
            self._chunks.put_nowait(ExecChunk(stdout=payload))
        elif kind == wire.ERR:
            self._chunks.put_nowait(ExecChunk(stderr=payload))
        elif kind == wire.EXIT:
            self.exited = True
            self._chunks.put_nowait(ExecChunk(exit_code=struct.unpack(">i", payload)[0]))
            self._credit_changed.set()  # a writer waiting for credit: none will come
        elif kind == wire.CREDIT:
            self._credit += struct.unpack(">I", payload)[0]
            self._credit_changed.set()

    def lost(self, why: Closed) -> None:
        self.answered.set()
        self._chunks.put_nowait(why)
        self._credit_changed.set()

    def buffered(self) -> int:
        """Output bytes received and not yet taken (at most a window)."""
        queued: list[ExecChunk | Closed] = list(self._chunks._queue)  # type: ignore[attr-defined]
        return sum(len(c.stdout) + len(c.stderr) for c in queued if isinstance(c, ExecChunk))

    # -- Terminal --------------------------------------------------------------

    async def output(self) -> AsyncIterator[ExecChunk]:
        while True:
            chunk = await self._chunks.get()
            if isinstance(chunk, Closed):
                raise UnavailableError(str(chunk))
            yield chunk
            if chunk.exit_code is not None:
                self._mux.forget(self._sid)
                return
            self._taken += len(chunk.stdout) + len(chunk.stderr)
            if self._taken >= CREDIT_BATCH:
                taken, self._taken = self._taken, 0
                self._owed -= taken
                # A closed connection is reported by what is queued (an exit, or Closed).
                with contextlib.suppress(UnavailableError):
                    await self._mux.send(self._sid, wire.CREDIT, struct.pack(">I", taken))

    async def write(self, data: bytes) -> None:
        """Input for the command; dropped once it has exited (as a closed pipe's)."""
        view = memoryview(data)
        while view and not self.exited:
            while self._credit <= 0 and not self.exited:
                if self._mux.closed is not None:
                    raise UnavailableError(str(self._mux.closed))
                self._credit_changed.clear()
                await self._credit_changed.wait()
            if self.exited:
                return
            n = min(len(view), self._credit, wire.CHUNK)
            self._credit -= n
            await self._mux.send(self._sid, wire.DATA, bytes(view[:n]))
            view = view[n:]

    async def close_stdin(self) -> None:
        if not self.exited:
            await self._mux.send(self._sid, wire.EOF)

    async def resize(self, rows: int, cols: int) -> None:
        pass  # pipes: no terminal to size

    async def close(self) -> None:
        if not self.exited and self._mux.closed is None:
            with contextlib.suppress(UnavailableError, OSError):
                await self._mux.send(self._sid, wire.KILL)
        self._mux.forget(self._sid)


class GuestMux:
    """The node's end of one guest's multiplexer: one connection, many commands."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str):
        self._reader, self._writer, self.name = reader, writer, name
        self._streams: dict[int, MuxStream] = {}
        self._next = 1
        self.closed: Closed | None = None
        self._ending: Closed | None = None  # why we closed it ourselves
        self._pump = asyncio.create_task(self._read_frames(), name=f"mux-{name}")

    @classmethod
    async def start_on(
        cls,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        workspace: str,
        start: Starter,
    ) -> GuestMux:
        """On a connection to the port (channel.py): start the guest's end, wait for its mark."""
        token = secrets.token_hex(16)
        try:
            writer.write(wire.MARK_HOST + token.encode() + b"\n")
            ended = await start(guest_command(token))
            await _await_mark(reader, wire.MARK_GUEST + token.encode() + b"\n", ended, workspace)
        except BaseException:
            writer.close()
            raise
        return cls(reader, writer, workspace)

    async def open(self, argv: Sequence[str], env: Mapping[str, str]) -> MuxStream:
        sid, self._next = self._next, self._next + 1
        stream = MuxStream(self, sid)
        self._streams[sid] = stream
        spec = json.dumps({"argv": list(argv), "env": dict(env)}).encode()

        async def start() -> None:
            await self.send(sid, wire.OPEN, spec)
            await stream.answered.wait()

        try:
            # Sending too: a guest end that stopped reading leaves the send waiting.
            # (asyncio.timeout: 3.11's wait_for can lose the caller's cancellation.)
            async with asyncio.timeout(OPEN_SECONDS):
                await start()
        except TimeoutError:
            self.forget(sid)
            # Nothing more will come on this connection.
            await self.aclose(f"the stream relay in workspace {self.name!r} stopped answering")
            raise Stalled(
                f"the stream relay in workspace {self.name!r} did not answer within "
                f"{OPEN_SECONDS:.0f}s"
            ) from None
        except BaseException:
            # Cancelled after the OPEN may have gone out: the command must not run on.
            self.forget(sid)
            if self.closed is None:
                self._writer.write(wire.HEADER.pack(sid, wire.KILL, 0))
            raise
        return stream

    async def send(self, sid: int, kind: int, payload: bytes = b"") -> None:
        if self.closed is not None:
            raise UnavailableError(str(self.closed))
        # One write per frame: frames of concurrent streams never interleave.
        self._writer.write(wire.HEADER.pack(sid, kind, len(payload)) + payload)
        try:
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            raise UnavailableError(f"the stream port of workspace {self.name!r}: {exc}") from exc

    def forget(self, sid: int) -> None:
        self._streams.pop(sid, None)

    async def _read_frames(self) -> None:
        why = Closed(
            f"the connection to workspace {self.name!r} ended: the guest stopped or restarted"
        )
        try:
            while True:
                header = await self._reader.readexactly(wire.HEADER.size)
                sid, kind, length = wire.HEADER.unpack(header)
                if length > wire.WINDOW:
                    raise Closed(f"the stream relay in workspace {self.name!r} sent a bad frame")
                payload = await self._reader.readexactly(length) if length else b""
                stream = self._streams.get(sid)
                if stream is not None:
                    stream.deliver(kind, payload)
        except Closed as broken:
            why = broken
        except struct.error:
            why = Closed(f"the stream relay in workspace {self.name!r} sent a bad frame")
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            self.closed = why = self._ending or why
            for stream in list(self._streams.values()):
                stream.lost(why)
            self._streams.clear()
            self._writer.close()

    async def aclose(self, why: str = "") -> None:
        self._ending = Closed(why or f"the connection to workspace {self.name!r} was closed")
        self._pump.cancel()
        # wait(), not await: a cancellation of our caller must not be swallowed here.
        await asyncio.wait({self._pump})


async def _await_mark(
    reader: asyncio.StreamReader,
    mark: bytes,
    ended: Callable[[], Awaitable[tuple[int, bytes] | None]],
    workspace: str,
) -> None:
    """Read up to ``mark`` (what is before it is stale); fail if the program ends first."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_SECONDS
    while True:
        try:
            # Consumes nothing until the mark is there; cancelling it loses nothing.
            async with asyncio.timeout(0.25):
                await reader.readuntil(mark)
            return
        except asyncio.LimitOverrunError as exc:  # much stale output: drop it, look on
            await reader.readexactly(exc.consumed)
            continue
        except asyncio.IncompleteReadError:
            raise UnavailableError(
                f"the stream port of workspace {workspace!r} closed: the guest stopped"
            ) from None
        except TimeoutError:
            pass
        finished = await ended()
        if finished is not None:
            code, err = finished
            if code == NO_PYTHON:
                raise NoPython(f"the guest of workspace {workspace!r} has no python3")
            said = err.decode("utf-8", "replace").strip() or "no output"
            raise FailedPreconditionError(
                f"the stream relay in workspace {workspace!r} could not start (exit code "
                f"{code}): {said}"
            )
        if loop.time() > deadline:
            raise DeadlineExceededError(
                f"the stream relay in workspace {workspace!r} did not answer within "
                f"{READY_SECONDS:.0f}s"
            )
