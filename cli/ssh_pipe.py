"""A session of `ssh NAME.vendetta` (scp, the image's sftp-server, rsync, git;
a shell on a terminal) through the agent's dial socket (cli/agent_route.py)
instead of a Connect stream: the same command, input and output, with no gRPC
message per chunk in this process or the agent and none of it in the
coordinator. On a terminal, the input goes in frames with the terminal's size
changes; a keystroke's echo came back in 2.6-2.9 ms through Connect, against
0.4 ms through the node's sshd. 400 MB by scp into a workspace on the bench's
node: 72 -> 103 MB/s; CPU of the proxy 2.7 -> 2.0 s, the agent 1.3 -> 0.7 s,
the coordinator 1.4 s -> none (docs/performance.md).

Both ways move in the event loop's callbacks, as `-L`'s bytes do
(common/forwarder.py): the SSH channel's input is written to the socket as
asyncssh takes it in (this module's protocol is the process's stdin writer,
asyncssh's own redirection hook), with no stream read, message or queue per
packet; the agent's frames go to the channel as they arrive. A full socket
stops the channel's input; a channel whose client is behind stops the socket
(a large download does not pile up here, and the command waits, as sshd makes
a child wait). The proxy's CPU per 400 MB of scp: 2.44 -> 2.22 s."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import asyncssh

from cli.agent_route import Link, open_route
from common.dial_wire import EXIT, RESIZE, STDERR, STDIN, STDOUT, Frames, frame
from common.errors import UnavailableError
from vendetta.v1 import common_pb2

# Bytes asyncssh keeps for the client before its own flow control pauses a
# channel (its default high-water mark): past them the agent's output waits.
CHANNEL_BACKLOG = 64 * 1024


class Piped:
    """How a routed session ended: the command's exit code, and whether the
    client's input was taken (an sftp session whose image had no sftp-server
    never takes it: the proxy's own SFTP server then serves it whole)."""

    def __init__(self, code: int, input_taken: bool) -> None:
        self.code = code
        self.input_taken = input_taken


class _Session(asyncio.Protocol):
    """The session's socket to the agent (an asyncio protocol), and the writer
    asyncssh gives the channel's input to (``SSHProcess.set_writer``: write,
    write_eof, write_exception, close)."""

    def __init__(
        self,
        process: asyncssh.SSHServerProcess[bytes],
        out: Callable[[bytes], object],
        gate: bytes,
        rest: bytes,
        preface: bytes = b"",
        tty: bool = False,
    ) -> None:
        self.process = process
        self.out = out
        self.gate = gate
        self.preface = preface
        self.tty = tty  # the input in frames (common/dial_wire.py)
        self._rest = rest  # what followed the handshake's answer
        self.frames = Frames()
        self.transport: asyncio.Transport | None = None
        self.ended: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.input_taken = False
        self._draining: asyncio.Task[None] | None = None
        self._feeding_paused = False

    def take_input(self) -> None:
        """From now on the channel's input (and what asyncssh holds of it) is ours."""
        if self.input_taken:
            return
        self.input_taken = True
        self.process.set_writer(self, True, None)
        self.process.feed_recv_buf(None, self)

    def give_back(self) -> None:
        """The channel's input to asyncssh's own reader again (and not paused by us)."""
        if self.input_taken and not self.process.is_closing():
            self._feeding_paused = False
            with contextlib.suppress(KeyError):  # asyncssh cleared it (the channel closed)
                self.process.clear_writer(None)

    # -- the socket ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.preface:
            self.write(self.preface)
        if not self.gate:
            self.take_input()
        if self._rest:
            rest, self._rest = self._rest, b""
            self.data_received(rest)

    def data_received(self, data: bytes) -> None:
        try:
            self._deliver(data)
        except OSError:  # the client's channel closed under us (BrokenPipeError)
            assert self.transport is not None
            self.transport.close()

    def _deliver(self, data: bytes) -> None:
        for kind, payload in self.frames.feed(data):
            if kind == STDOUT:
                if self.gate and not self.input_taken:
                    payload = payload.removeprefix(self.gate)
                    self.take_input()
                if payload:
                    self.out(payload)
            elif kind == STDERR:
                self.process.stderr.write(payload)
            elif kind == EXIT and not self.ended.done():
                self.ended.set_result(int(payload))
        channel = self.process.channel
        if self._draining is None and channel.get_write_buffer_size() > CHANNEL_BACKLOG:
            assert self.transport is not None
            self.transport.pause_reading()
            self._draining = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        with contextlib.suppress(Exception):  # the channel closed: connection_lost ends it
            await self.process.stdout.drain()
        self._draining = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        return False  # the agent is done: close

    def pause_writing(self) -> None:  # the socket is full: take no more of the channel
        if not self._feeding_paused:
            self._feeding_paused = True
            self.process.pause_feeding(None)

    def resume_writing(self) -> None:
        if self._feeding_paused:
            self._feeding_paused = False
            with contextlib.suppress(KeyError):  # give_back resumed it already
                self.process.resume_feeding(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ended.done():
            why = "the connection to the workspace's agent ended (node reconnecting?)"
            self.ended.set_exception(UnavailableError(why))

    # -- asyncssh's writer: the channel's input --------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(STDIN, data) if self.tty else data)

    def write_eof(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write_eof()

    def write_exception(self, exc: Exception) -> None:
        # A terminal's new size; a break or a signal, nothing the agent takes.
        if not (self.tty and isinstance(exc, asyncssh.TerminalSizeChanged)):
            return
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(RESIZE, f"{exc.height} {exc.width}".encode()))

    def close(self) -> None:
        pass  # the socket is closed by run(), after the exit code


async def run(
    link: Link,
    start: common_pb2.AttachStart,
    process: asyncssh.SSHServerProcess[bytes],
    out: Callable[[bytes], object],
    gate: bytes = b"",
    preface: bytes = b"",
) -> Piped | None:
    """``start`` (on a terminal or not) with ``process``'s channel as its input and
    ``out`` taking its stdout (its stderr to the channel's). ``gate``: the input
    is taken only once stdout begins with it (removed), as an sftp session's
    shell says its sftp-server runs. ``preface``: the command's input before the
    channel's. None where there is no route to the agent: the caller runs it
    through Connect, the input untouched."""
    request: dict[str, Any] = {"argv": list(start.argv), "env": dict(start.env)}
    if start.tty:
        request.update(tty=True, rows=start.size.rows, cols=start.size.cols)
    routed = await open_route(link, common_pb2.DialStart(workspace=start.workspace), **request)
    if routed is None:
        return None
    if not routed.answer.get("connected"):
        routed.sock.close()
        raise UnavailableError(routed.error or "the command did not start")
    if start.tty and routed.answer.get("tty") is not True:
        routed.sock.close()  # an older agent ran it on pipes: it ends; Connect it is
        return None
    session = _Session(process, out, gate, routed.rest, preface, start.tty)
    loop = asyncio.get_running_loop()
    try:
        transport, _ = await loop.create_unix_connection(lambda: session, sock=routed.sock)
    except BaseException:
        routed.sock.close()
        raise
    try:
        code = await session.ended
    finally:
        session.give_back()
        if session._draining is not None:
            session._draining.cancel()
        transport.close()
    return Piped(code, session.input_taken)
