"""`workspace connect`: a terminal (raw mode, resizes) or a command, over one stream."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import shutil
import signal
import sys
import termios
import threading
import tty
from collections.abc import AsyncIterator, Callable
from typing import TextIO

from vendetta.v1 import common_pb2, coordinator_pb2_grpc


def _size() -> common_pb2.TerminalSize:
    # The terminal's own size first: COLUMNS/LINES in the environment may be stale.
    try:
        cols, rows = os.get_terminal_size(sys.stdout.fileno())
    except OSError:
        cols, rows = shutil.get_terminal_size()
    return common_pb2.TerminalSize(rows=rows, cols=cols)


async def session(
    c: coordinator_pb2_grpc.CoordinatorAsyncStub,
    workspace: str,
    argv: list[str],
    interactive: bool,
    stdin: bool = True,
) -> int:
    """Run the session; return the remote exit code. ``stdin`` False: the command
    reads end-of-file at once, and ours is left alone (as ``ssh -n``)."""
    queue: asyncio.Queue[common_pb2.AttachInput | None] = asyncio.Queue()
    start = common_pb2.AttachStart(workspace=workspace, argv=argv, tty=interactive, size=_size())

    loop = asyncio.get_running_loop()
    fd = sys.stdin.fileno()
    saved = None
    if interactive:
        saved = termios.tcgetattr(fd)
        tty.setraw(fd)

        def on_stdin() -> None:
            data = os.read(fd, 4096)
            if data:
                queue.put_nowait(common_pb2.AttachInput(stdin=data))
            else:
                loop.remove_reader(fd)
                queue.put_nowait(common_pb2.AttachInput(stdin_eof=True))

        loop.add_reader(fd, on_stdin)
        loop.add_signal_handler(
            signal.SIGWINCH, lambda: queue.put_nowait(common_pb2.AttachInput(resize=_size()))
        )
    elif stdin:
        queue = asyncio.Queue(maxsize=STDIN_BACKLOG)
        threading.Thread(target=_read_stdin, args=(fd, queue, loop), daemon=True).start()
    else:
        queue.put_nowait(common_pb2.AttachInput(stdin_eof=True))
    try:
        return await stream(c, start, queue, _write(sys.stdout), _write(sys.stderr))
    finally:
        if saved is not None:
            loop.remove_reader(fd)
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signal.SIGWINCH)
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


# Chunks of piped stdin read ahead of the stream (64 KiB each).
STDIN_BACKLOG = 64


def _read_stdin(
    fd: int,
    queue: asyncio.Queue[common_pb2.AttachInput | None],
    loop: asyncio.AbstractEventLoop,
) -> None:
    """Piped stdin to the session, then end-of-file; waits while the stream lags.

    A thread: stdin may be a file, which the event loop cannot watch.
    """

    def put(msg: common_pb2.AttachInput) -> None:
        coro = queue.put(msg)
        try:
            asyncio.run_coroutine_threadsafe(coro, loop).result()
        except RuntimeError:  # the loop is closed: the session is over
            coro.close()
            raise

    try:
        try:
            while data := os.read(fd, 65536):
                put(common_pb2.AttachInput(stdin=data))
        except OSError:
            pass  # no readable stdin (closed, or not ours): end-of-file all the same
        put(common_pb2.AttachInput(stdin_eof=True))
    except (RuntimeError, concurrent.futures.CancelledError):
        pass  # the session is over


def _write(f: TextIO) -> Callable[[bytes], None]:
    def write(data: bytes) -> None:
        f.buffer.write(data)
        f.flush()

    return write


async def stream(
    c: coordinator_pb2_grpc.CoordinatorAsyncStub,
    start: common_pb2.AttachStart,
    inputs: asyncio.Queue[common_pb2.AttachInput | None],
    stdout: Callable[[bytes], object],
    stderr: Callable[[bytes], object],
) -> int:
    """One Connect stream: ``start``, then ``inputs`` until None; the remote exit code.

    Input waits until the session is open (the agent's first, empty, message),
    and ends with the exit code: input sent into a stream that was failing at
    its start, or ending, got gRPC to report "Internal error from Core" instead
    of the call's own status.
    """
    opened = asyncio.Event()

    async def requests() -> AsyncIterator[common_pb2.AttachInput]:
        yield common_pb2.AttachInput(start=start)
        await opened.wait()
        while (msg := await inputs.get()) is not None:
            yield msg

    def end_input() -> None:
        # What is still queued will never be read: drop it, so the end fits.
        while not inputs.empty():
            inputs.get_nowait()
        inputs.put_nowait(None)
        opened.set()

    code = 0
    try:
        async for out in c.Connect(requests()):
            opened.set()
            kind = out.WhichOneof("output")
            if kind == "stdout":
                stdout(out.stdout)
            elif kind == "stderr":
                stderr(out.stderr)
            elif kind == "exit_code":
                code = out.exit_code
                end_input()  # the session ends once our input has (see the agent's Attach)
    finally:
        end_input()
    return code
