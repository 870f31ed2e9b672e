"""The SSH proxy's connection on its own stdin and stdout, with no thread.

OpenSSH runs a ProxyCommand on two pipes. asyncssh takes one connected socket,
so the proxy used to copy between the pipes and a socket pair in two threads:
every byte crossed Python twice more, and the threads fought the event loop for
the GIL (a third of the proxy's CPU in a `scp` profile). Here asyncssh's
connection reads and writes the pipes through asyncio's own pipe transports,
handed to it as a tunnel (the `tunnel` option: anything with
`create_connection(factory, host, port)`).
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Callable
from typing import Any

from common.pipes import widen


class _Duplex(asyncio.Transport):
    """One transport over a read pipe and a write pipe, for asyncssh's connection."""

    def __init__(self, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self._protocol = protocol
        self.reader: asyncio.ReadTransport | None = None
        self.writer: asyncio.WriteTransport | None = None
        self._lost = False

    # What asyncssh's connection calls.
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(data)

    def is_closing(self) -> bool:
        return self.writer is None or self.writer.is_closing()

    def close(self) -> None:
        for side in (self.reader, self.writer):
            if side is not None:
                side.close()

    def abort(self) -> None:
        if self.reader is not None:
            self.reader.close()
        if self.writer is not None:
            self.writer.abort()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default  # no socket, no addresses: asyncssh skips what needs them

    def pause_reading(self) -> None:
        if self.reader is not None:
            self.reader.pause_reading()

    def resume_reading(self) -> None:
        if self.reader is not None:
            self.reader.resume_reading()

    # From the two pipes.
    def lost(self, exc: Exception | None) -> None:
        """Either pipe ended: the connection is over (once)."""
        if not self._lost:
            self._lost = True
            self.close()
            self._protocol.connection_lost(exc)


class _ReadSide(asyncio.Protocol):
    def __init__(self, duplex: _Duplex, protocol: asyncio.Protocol) -> None:
        self._duplex = duplex
        self._protocol = protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Called before the first data: the connection starts (sends its version) now.
        self._duplex.reader = transport  # type: ignore[assignment]
        self._protocol.connection_made(self._duplex)

    def data_received(self, data: bytes) -> None:
        self._protocol.data_received(data)

    def eof_received(self) -> bool | None:
        self._duplex.lost(None)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._duplex.lost(exc)


class _WriteSide(asyncio.BaseProtocol):
    def __init__(self, duplex: _Duplex, protocol: asyncio.BaseProtocol) -> None:
        self._duplex = duplex
        self._protocol = protocol

    # A full pipe holds the connection's writers back (asyncssh stops reading its
    # channels' sources): without this, all a fast source sent piled up here, and
    # each write to the pipe moved what was left of the pile.
    def pause_writing(self) -> None:
        self._protocol.pause_writing()

    def resume_writing(self) -> None:
        self._protocol.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._duplex.lost(exc)  # the client closed our stdout: it has gone


class StdioTunnel:
    """asyncssh's `tunnel` for a server connection on file descriptors 0 and 1.

    Raises ValueError from `create_connection` where stdin or stdout is not a
    pipe or socket: the caller then falls
    back to copying through a socket pair."""

    def __init__(self, read_fd: int = 0, write_fd: int = 1) -> None:
        self._read_fd = read_fd
        self._write_fd = write_fd

    async def create_connection(
        self, session_factory: Callable[[], asyncio.Protocol], host: str, port: int
    ) -> tuple[asyncio.Transport, asyncio.Protocol]:
        loop = asyncio.get_running_loop()
        for fd in (self._read_fd, self._write_fd):
            widen(fd)
        protocol = session_factory()
        duplex = _Duplex(protocol)
        # Own copies of the descriptors: the transports close what they are given.
        wfile = os.fdopen(os.dup(self._write_fd), "wb", buffering=0)
        rfile = os.fdopen(os.dup(self._read_fd), "rb", buffering=0)
        try:
            duplex.writer, _ = await loop.connect_write_pipe(
                lambda: _WriteSide(duplex, protocol), wfile
            )
            await loop.connect_read_pipe(lambda: _ReadSide(duplex, protocol), rfile)
        except BaseException:
            if duplex.writer is not None:
                duplex.writer.close()
            else:
                wfile.close()
            rfile.close()
            raise
        return duplex, protocol

    @staticmethod
    def usable(read_fd: int = 0, write_fd: int = 1) -> bool:
        """Both descriptors are what asyncio's pipe transports take."""
        try:
            modes = [os.fstat(fd).st_mode for fd in (read_fd, write_fd)]
        except OSError:
            return False
        # Not a terminal (run by hand): asyncio would leave it non-blocking for the shell.
        return all(stat.S_ISFIFO(m) or stat.S_ISSOCK(m) for m in modes)
