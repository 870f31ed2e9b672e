"""`workspace connect`: a terminal (raw mode, resizes) or a command, over one stream."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import termios
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
    c: coordinator_pb2_grpc.CoordinatorAsyncStub, workspace: str, argv: list[str], interactive: bool
) -> int:
    """Run the session; return the remote exit code."""
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
    try:
        return await stream(c, start, queue, _write(sys.stdout), _write(sys.stderr))
    finally:
        if saved is not None:
            loop.remove_reader(fd)
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signal.SIGWINCH)
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


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
    """One Connect stream: ``start``, then ``inputs`` until None; the remote exit code."""

    async def requests() -> AsyncIterator[common_pb2.AttachInput]:
        yield common_pb2.AttachInput(start=start)
        while (msg := await inputs.get()) is not None:
            yield msg

    code = 0
    try:
        async for out in c.Connect(requests()):
            kind = out.WhichOneof("output")
            if kind == "stdout":
                stdout(out.stdout)
            elif kind == "stderr":
                stderr(out.stderr)
            elif kind == "exit_code":
                code = out.exit_code
    finally:
        inputs.put_nowait(None)
    return code
