"""The agent's dial socket (`dial.sock` beside `agent.sock`, 0600 like it): the
connections of `ssh -L`/`-D` through NAME.vendetta, and the commands of its
sessions (scp, sftp-server, rsync, git; interactive ones on a terminal), as
plain byte streams, for clients that can reach the socket (the coordinator forwards it
beside the agent's gRPC socket, and `vendetta ssh-proxy` connects to that when
it runs on the coordinator's machine). A command runs as Attach runs it
(`Provider.pipe`, or `Provider.attach` on a terminal).

The same connection through the Dial RPC is a gRPC message per chunk in the
proxy, the coordinator and here; on this path, each chunk is one write in the
event loop's callbacks (common/forwarder.py) in the proxy and here, and the
coordinator does not see it. The target is reached as Dial reaches it
(nodeagent/dial.py): a published port straight from here (direct_target),
anything else through the relay inside. The handshake is common/dial_wire.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from pathlib import Path
from typing import Any

from common.dial_wire import (
    EXIT,
    RESIZE,
    STDERR,
    STDIN,
    STDOUT,
    Frames,
    HandshakeError,
    encode,
    frame,
    read_line,
)
from common.errors import InvalidArgumentError, VendettaError
from common.forwarder import Forwarder
from nodeagent.dial import (
    DIRECT_TIMEOUT,
    MESSAGE,
    Relay,
    check_start,
    coalesced,
    direct_target,
    nodelay,
    open_relay,
)
from nodeagent.providers import ProviderSet
from providers.base import Terminal
from vendetta.v1 import common_pb2

log = logging.getLogger("vendetta.agent.dial")

CONNECTED = encode({"connected": True})
CONNECTED_TTY = encode({"connected": True, "tty": True})


def _start(message: dict[str, Any]) -> common_pb2.DialStart:
    try:
        start = common_pb2.DialStart(
            workspace=str(message["workspace"]),
            provider=str(message["provider"]),
            host=str(message["host"]),
            port=int(message["port"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidArgumentError(
            f"a dial handshake names workspace, provider, host, port: {exc}"
        ) from None
    check_start(start)
    return start


def _size(message: dict[str, Any]) -> tuple[int, int]:
    """rows, cols of a terminal's handshake (80x24 where it names none)."""
    try:
        return int(message.get("rows") or 24), int(message.get("cols") or 80)
    except (TypeError, ValueError):
        raise InvalidArgumentError("a terminal's rows and cols are numbers") from None


def _command(message: dict[str, Any]) -> tuple[str, list[str], dict[str, str]]:
    """workspace, argv, env of a command's handshake."""
    argv, env = message.get("argv"), message.get("env") or {}
    if not isinstance(argv, list) or not argv or not isinstance(env, dict):
        raise InvalidArgumentError("a command's handshake names its argv (a list) and env")
    return (
        str(message.get("workspace", "")),
        [str(a) for a in argv],
        {str(k): str(v) for k, v in env.items()},
    )


class DialSocketServer:
    def __init__(self, path: Path, providers: ProviderSet) -> None:
        self.path = path
        self.providers = providers
        self._sock: socket.socket | None = None
        self._accept: asyncio.Task[None] | None = None
        self._open: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # 0600 from the start, as agent.sock
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old_umask)
        sock.listen(64)
        sock.setblocking(False)
        self._sock = sock
        self._accept = asyncio.create_task(self._serve(sock))

    async def close(self) -> None:
        tasks = [t for t in (self._accept, *self._open) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(sock)
            conn.setblocking(False)
            task = asyncio.create_task(self._handle(conn))
            self._open.add(task)
            task.add_done_callback(self._open.discard)

    async def _handle(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        owned = False  # once a transport owns the socket, it closes it
        try:
            message, rest = await read_line(conn)
            if "argv" in message:
                provider = self.providers.get(str(message.get("provider", "")))
                workspace, argv, env = _command(message)
                tty = message.get("tty") is True
                if tty:
                    rows, cols = _size(message)
                    terminal = await provider.attach(workspace, argv, rows=rows, cols=cols, env=env)
                else:
                    terminal = await provider.pipe(workspace, argv, env)
                owned = True
                await _run(conn, terminal, rest, tty)
                return
            start = _start(message)
            provider = self.providers.get(start.provider)
            target = await direct_target(provider, start.workspace, start.host, start.port)
            if target is not None and message.get("redirect"):
                # The client reaches it without us (cli/tunnel_master.py).
                await loop.sock_sendall(conn, encode({"redirect": list(target)}))
                return
            if target is not None and await self._direct(conn, target, rest):
                owned = True
                return
            relay = await open_relay(provider, start)
            owned = True
            await _relay(conn, relay, rest)
        except VendettaError as exc:
            with contextlib.suppress(OSError):
                await loop.sock_sendall(conn, encode({"error": str(exc)}))
        except HandshakeError as exc:
            log.warning("dial socket: %s", exc)
        except OSError:
            pass  # the client went
        finally:
            if not owned:
                conn.close()

    async def _direct(self, conn: socket.socket, target: tuple[str, int], rest: bytes) -> bool:
        """Connected straight to ``target`` (nodeagent/dial.py); False if it refused."""
        loop = asyncio.get_running_loop()
        client, service = Forwarder.pair()
        client.hold(rest)
        try:
            transport, _ = await asyncio.wait_for(
                loop.create_connection(lambda: service, *target), DIRECT_TIMEOUT
            )
        except (OSError, TimeoutError):
            return False
        nodelay(transport.get_extra_info("socket"))
        try:
            await loop.sock_sendall(conn, CONNECTED)
            await loop.create_unix_connection(lambda: client, sock=conn)
        except BaseException:
            transport.close()
            raise
        return True


async def _relay(conn: socket.socket, relay: Relay, rest: bytes) -> None:
    """Through the relay inside: its output to the client until it ends."""
    try:
        await asyncio.get_running_loop().sock_sendall(conn, CONNECTED)
        reader, writer = await asyncio.open_unix_connection(sock=conn, limit=MESSAGE)
    except BaseException:
        conn.close()
        await relay.close()
        raise

    async def upstream() -> None:
        if rest:
            await relay.pipe.write(rest)
        while data := await reader.read(MESSAGE):
            await relay.pipe.write(data)
        await relay.pipe.close_stdin()

    up = asyncio.create_task(upstream())
    try:
        if relay.first:
            writer.write(relay.first)
        async for data in coalesced(relay.output):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    finally:
        up.cancel()
        await asyncio.gather(up, return_exceptions=True)
        await relay.close()
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _run(conn: socket.socket, terminal: Terminal, rest: bytes, tty: bool) -> None:
    """A command: the client's bytes to its stdin (in frames on a terminal, with its
    size), its output to the client in frames (common/dial_wire.py), the exit code
    last."""
    try:
        await asyncio.get_running_loop().sock_sendall(conn, CONNECTED_TTY if tty else CONNECTED)
        reader, writer = await asyncio.open_unix_connection(sock=conn, limit=MESSAGE)
    except BaseException:
        conn.close()
        with contextlib.suppress(Exception):
            await terminal.close()
        raise

    async def stdin() -> None:
        frames = Frames() if tty else None
        data = rest
        while True:
            if frames is None:
                if data:
                    await terminal.write(data)
            else:
                for kind, payload in frames.feed(data):
                    if kind == STDIN:
                        await terminal.write(payload)
                    elif kind == RESIZE:
                        rows, _, cols = payload.partition(b" ")
                        with contextlib.suppress(ValueError):
                            await terminal.resize(int(rows), int(cols))
            if not (data := await reader.read(MESSAGE)):
                break
        await terminal.close_stdin()

    up = asyncio.create_task(stdin())
    try:
        async for chunk in terminal.output():
            if chunk.stdout:
                writer.write(frame(STDOUT, chunk.stdout))
            if chunk.stderr:
                writer.write(frame(STDERR, chunk.stderr))
            if chunk.exit_code is not None:
                writer.write(frame(EXIT, str(chunk.exit_code).encode()))
            await writer.drain()
    finally:
        up.cancel()
        await asyncio.gather(up, return_exceptions=True)
        with contextlib.suppress(Exception):
            await terminal.close()
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
