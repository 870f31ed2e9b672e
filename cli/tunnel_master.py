"""A connection from the node, opened by the OpenSSH child that carries the
node's tunnel (its ControlMaster socket, coordinator/transports/openssh_tunnel.py):
`ssh -W HOST:PORT` as a multiplexing client hands two pipes of this process to
the master, which moves the bytes itself. For `ssh -L` to a port the workspace
publishes, the agent answers where it would connect (nodeagent/dial_socket.py,
`redirect`), and the bytes go proxy -> ssh -> sshd -> the container: no Python
process on the node's side of the path.

Two pipes, not a socket: the master ends each way apart (it closes the output
descriptor on the far side's end of file), and a socket given as both would
stay open until the whole channel closed, which waits for our end of file.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
from typing import Any

from common.forwarder import Forwarder
from common.pipes import widen

# Each pipe's size. With Linux's 64 KiB the master and this process took turns
# over a few packets at a time: `ssh -L` to a published port ran at 0.68-0.80x
# of OpenSSH's own, and at 0.86-1.17x with this (docs/performance.md, step 7).
# Not more: every connection holds two, and a pipe's pages count against the
# user's pipe-user-pages-soft (64 MiB), past which each new pipe gets one page.
PIPE_SIZE = 256 * 1024

# The multiplexing clients still running (each ends with its connection).
_clients: set[asyncio.Task[int]] = set()


async def connect(control: str, host: str, port: int, side: Forwarder) -> bool:
    """``side`` connected to HOST:PORT as the node reaches it; False where the master
    cannot be reached (the tunnel reconnecting, no `ssh` here)."""
    ssh = shutil.which("ssh")
    if ssh is None or not stat.S_ISSOCK(_mode(control)):
        return False
    to_r, to_w = os.pipe()  # our bytes -> the master
    from_r, from_w = os.pipe()  # the master -> us
    for fd in (to_w, from_r):
        widen(fd, PIPE_SIZE)
    try:
        proc = await asyncio.create_subprocess_exec(
            ssh, "-F", "/dev/null",
            "-o", f"ControlPath={control}",
            "-o", "ControlMaster=no",
            "-o", "BatchMode=yes",
            "-o", "ProxyCommand=false",  # never a connection of its own if the master is gone
            "-o", "LogLevel=QUIET",
            "-W", f"{host}:{port}", "vendetta-node",
            stdin=to_r, stdout=from_w, stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    except OSError:
        for fd in (to_w, from_r):
            os.close(fd)
        return False
    finally:
        for fd in (to_r, from_w):
            os.close(fd)
    waiter = asyncio.create_task(proc.wait())
    _clients.add(waiter)
    waiter.add_done_callback(_clients.discard)
    loop = asyncio.get_running_loop()
    pipes = _Pipes(side)
    pipes.writer, _ = await loop.connect_write_pipe(
        lambda: _WriteSide(side, pipes), os.fdopen(to_w, "wb", buffering=0)
    )
    pipes.reader, _ = await loop.connect_read_pipe(
        lambda: _ReadSide(side, pipes), os.fdopen(from_r, "rb", buffering=0)
    )
    return True


class _Pipes:
    """The two pipes as the one transport a Forwarder side writes to."""

    def __init__(self, side: Forwarder) -> None:
        self.side = side
        self.reader: Any = None
        self.writer: Any = None

    def write(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.writer.close()  # after what it holds: the master reads end of file

    def pause_reading(self) -> None:
        self.reader.pause_reading()

    def resume_reading(self) -> None:
        self.reader.resume_reading()

    def close(self) -> None:
        self.writer.close()
        self.reader.close()


class _ReadSide(asyncio.Protocol):
    def __init__(self, side: Forwarder, pipes: _Pipes) -> None:
        self.side = side
        self.pipes = pipes

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.pipes.reader = transport
        self.side.connection_made(self.pipes)

    def data_received(self, data: bytes) -> None:
        self.side.data_received(data)

    def eof_received(self) -> bool | None:
        self.side.eof_received()
        return None  # the read pipe closes; the write pipe may go on

    def connection_lost(self, exc: Exception | None) -> None:
        if self.pipes.writer.is_closing():
            self.side.connection_lost(exc)  # both ways over


class _WriteSide(asyncio.BaseProtocol):
    def __init__(self, side: Forwarder, pipes: _Pipes) -> None:
        self.side = side
        self.pipes = pipes

    def connection_lost(self, exc: Exception | None) -> None:
        if self.pipes.reader is None or self.pipes.reader.is_closing():
            self.side.connection_lost(exc)  # both ways over

    def pause_writing(self) -> None:
        self.side.pause_writing()

    def resume_writing(self) -> None:
        self.side.resume_writing()


def _mode(path: str) -> int:
    try:
        return os.stat(path).st_mode
    except OSError:
        return 0
