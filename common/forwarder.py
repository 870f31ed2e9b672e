"""Bytes between two endpoints in the event loop's callbacks: each chunk read on
one side is written to the other at once, with no task, queue or message of
ours per chunk, and the sides' own flow control (a full write buffer pauses the
reading of the other side). An endpoint is an asyncio transport (a socket) or
an asyncssh channel: both offer write, write_eof, pause/resume_reading and
close, and call back data_received, eof_received, pause/resume_writing and
connection_lost. This is the data path of `ssh -L`/`-D` through NAME.vendetta,
in the proxy and in the agent (docs/performance.md, "Editors").
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

F = TypeVar("F", bound="Forwarder")
G = TypeVar("G", bound="Forwarder")


def join(a: F, b: G) -> tuple[F, G]:
    """Each side's bytes to the other."""
    a.peer, b.peer = b, a
    return a, b


class Forwarder(asyncio.Protocol):
    """One side of a pair made by :meth:`pair`. A side that reads before the
    other is connected holds what it read (and pauses) until then."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.peer: Forwarder = self
        self._held: list[bytes] = []
        self._eof_held = False
        self._eof_in = False
        self._lost = False

    @classmethod
    def pair(cls) -> tuple[Forwarder, Forwarder]:
        return join(cls(), cls())

    def hold(self, data: bytes) -> None:
        """Bytes read for the peer before this side's transport existed (a handshake's
        tail): written to the peer first."""
        if data:
            self._held.append(data)

    # -- callbacks (asyncio.Protocol and asyncssh.SSHTCPSession alike) ----------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        if self.peer._lost:
            transport.close()
            return
        peer = self.peer
        for data in peer._held:
            transport.write(data)
        peer._held.clear()
        if peer._eof_held:
            self._write_eof()
        if peer.transport is not None:
            peer.transport.resume_reading()

    def data_received(self, data: bytes, datatype: object = None) -> None:
        out = self.peer.transport
        if out is None:
            self._held.append(data)
            self.transport.pause_reading()
        else:
            out.write(data)

    def eof_received(self) -> bool:
        self._eof_in = True
        if self.peer.transport is None:
            self._eof_held = True
        else:
            self.peer._write_eof()
        if self.peer._eof_in:  # both ways ended
            self.close()
        return True  # half-open: the other way may still carry bytes

    def pause_writing(self) -> None:
        if self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._lost = True
        if self.peer.transport is not None and not self.peer._lost:
            self.peer.transport.close()  # after what it still has to write

    # -- ours ------------------------------------------------------------------------

    def _write_eof(self) -> None:
        if self.transport is not None and not self._lost and self.transport.can_write_eof():
            self.transport.write_eof()

    def close(self) -> None:
        for side in (self, self.peer):
            if side.transport is not None and not side._lost:
                side.transport.close()
