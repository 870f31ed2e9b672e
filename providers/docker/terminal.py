"""Sessions in containers: an exec with stdin on a raw socket, with a TTY (a
terminal) or without (pipes: Docker's multiplexed frames keep stdout and
stderr apart)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any

from common.errors import VendettaError
from providers.base import ExecChunk, Terminal
from providers.docker import execs
from providers.docker.streams import STDOUT, THREAD_PREFIX, exec_frames, shutdown_socket
from providers.threaded import EngineClient, ThreadedWriter, open_or_abandon


async def open_session(
    engine: EngineClient[Any],
    container_id: str,
    argv: Sequence[str],
    env: Mapping[str, str] | None,
    *,
    name: str,
    size: tuple[int, int] | None,
    action: str,
    on_error: Callable[[Exception], Exception],
) -> DockerTerminal:
    """argv in the container with stdin on a socket: on a TTY of ``size`` (rows,
    cols), or on pipes when ``size`` is None. A caller cancelled meanwhile leaves
    nothing open."""
    tty = size is not None

    async def opening() -> DockerTerminal:
        exec_id = await engine.call(
            action,
            lambda api: execs.create_exec(api, container_id, argv, env, stdin=True, tty=tty),
        )
        sock = await engine.call(action, lambda api: api.exec_start(exec_id, socket=True, tty=tty))
        session = DockerTerminal(
            engine, exec_id, sock, name, tty=tty, action=action, on_error=on_error
        )
        if size is not None:
            await session.resize(*size)
            session.settle_size()
        return session

    return await open_or_abandon(opening, lambda session: session.close())


class DockerTerminal(Terminal):
    def __init__(
        self,
        engine: EngineClient[Any],
        exec_id: str,
        sock: Any,
        name: str,
        *,
        tty: bool,
        action: str,
        on_error: Callable[[Exception], Exception],
    ) -> None:
        self._engine = engine
        self._tty = tty
        self._exec_id = exec_id
        self._sock = sock
        self._raw = getattr(sock, "_sock", sock)
        self._name = name
        self._action = action
        self._on_error = on_error
        self._settle: asyncio.Task[None] | None = None
        self._size = (24, 80)
        self._resizing = asyncio.Lock()
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
        output = execs.chunks(
            self._engine,
            self._exec_id,
            lambda: (self._chunks(), lambda: shutdown_socket(self._sock)),
            thread_name=f"{THREAD_PREFIX}{'tty' if self._tty else 'pipe'}-{self._name}",
            action=self._action,
            on_error=self._on_error,
        )
        async with contextlib.aclosing(output):
            async for chunk in output:
                yield chunk

    async def write(self, data: bytes) -> None:
        await self._stdin.write(data)

    async def close_stdin(self) -> None:
        if not self._tty:  # a terminal has no end-of-file of its own (^D is the shell's)
            self._stdin.close()

    async def resize(self, rows: int, cols: int) -> None:
        if not self._tty:
            return
        self._size = (rows, cols)
        await self._apply()

    async def _apply(self) -> None:
        """The latest size, one call at a time: a re-apply queued behind the user's
        resize then sends the new size, never the old one after it."""
        async with self._resizing:
            rows, cols = self._size
            with contextlib.suppress(VendettaError):  # the process may have just ended
                await self._engine.call(
                    "resizing a terminal",
                    lambda api: api.exec_resize(self._exec_id, height=rows, width=cols),
                )

    def settle_size(self) -> None:
        """Apply the size again shortly: a resize sent right after the exec starts
        can land before its PTY exists (Docker's own CLI retries too), later on a
        busy node. Always the latest size, so a resize from the user in between is
        never undone."""

        async def again() -> None:
            for delay in (0.05, 0.2, 0.5, 1.0, 2.0):
                await asyncio.sleep(delay)
                await self._apply()

        self._settle = asyncio.create_task(again())

    async def close(self) -> None:
        self._stdin.close()
        if self._settle is not None:
            self._settle.cancel()
        with contextlib.suppress(OSError):
            self._raw.shutdown(socket.SHUT_WR)
        shutdown_socket(self._sock)
