"""Sessions in containers: an exec with stdin on a raw socket, with a TTY (a
terminal) or without (pipes: Docker's multiplexed frames keep stdout and
stderr apart)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

from providers.base import ExecChunk, Terminal
from providers.docker.streams import STDERR, STDOUT, THREAD_PREFIX, exec_frames, shutdown_socket
from providers.threaded import ThreadedStream, ThreadedWriter


class DockerTerminal(Terminal):
    def __init__(self, api: Any, exec_id: str, sock: Any, name: str, *, tty: bool) -> None:
        self._api = api
        self._tty = tty
        self._exec_id = exec_id
        self._sock = sock
        self._raw = getattr(sock, "_sock", sock)
        self._name = name
        self._settle: asyncio.Task[None] | None = None
        self._size = (24, 80)
        self._stdin = ThreadedWriter(
            f"{THREAD_PREFIX}stdin-{name}",
            self._raw.sendall,
            # End-of-file: Docker passes a half-close on to the command's stdin.
            None if tty else lambda: self._raw.shutdown(socket.SHUT_WR),
        )

    def _chunks(self) -> Iterator[tuple[int, bytes]]:
        if not self._tty:
            yield from exec_frames(self._sock)
            return
        while data := self._raw.recv(65536):
            yield STDOUT, bytes(data)

    async def output(self) -> AsyncIterator[ExecChunk]:
        stream: ThreadedStream[tuple[int, bytes]] = ThreadedStream(
            f"{THREAD_PREFIX}{'tty' if self._tty else 'pipe'}-{self._name}",
            lambda: (self._chunks(), lambda: shutdown_socket(self._sock)),
            lambda exc: exc,
        )
        try:
            async for stream_id, data in stream:
                yield ExecChunk(stderr=data) if stream_id == STDERR else ExecChunk(stdout=data)
        finally:
            await stream.aclose()
        delay = 0.005
        while True:  # the output ends just before Docker records the exit code
            result = await asyncio.to_thread(self._api.exec_inspect, self._exec_id)
            if not result.get("Running"):
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
        code = result.get("ExitCode")
        yield ExecChunk(exit_code=int(code) if code is not None else -1)

    async def write(self, data: bytes) -> None:
        await self._stdin.write(data)

    async def close_stdin(self) -> None:
        if not self._tty:  # a terminal has no end-of-file of its own (^D is the shell's)
            self._stdin.close()

    async def resize(self, rows: int, cols: int) -> None:
        if not self._tty:
            return
        self._size = (rows, cols)
        await self._apply(rows, cols)

    async def _apply(self, rows: int, cols: int) -> None:
        with contextlib.suppress(Exception):  # the process may have just ended
            await asyncio.to_thread(self._api.exec_resize, self._exec_id, height=rows, width=cols)

    def settle_size(self) -> None:
        """Apply the size again shortly: a resize sent right after the exec starts
        can land before its PTY exists (Docker's own CLI retries too). Always the
        latest size, so a resize from the user in between is never undone."""

        async def again() -> None:
            for delay in (0.05, 0.2, 0.5):
                await asyncio.sleep(delay)
                await self._apply(*self._size)

        self._settle = asyncio.create_task(again())

    async def close(self) -> None:
        self._stdin.close()
        if self._settle is not None:
            self._settle.cancel()
        with contextlib.suppress(OSError):
            self._raw.shutdown(socket.SHUT_WR)
        shutdown_socket(self._sock)
