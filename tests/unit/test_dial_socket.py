"""The agent's dial socket (nodeagent/dial_socket.py) with a provider whose
environment is this machine (tests/support/local_pipes.py): the handshake, bytes
both ways with half-close, a server that speaks first, the relay when the
environment's address refuses, and the refusals a client sees."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import pytest

from common import dial_wire
from common.dial_wire import EXIT, STDERR, STDOUT, Frames, HandshakeError, encode, frame
from nodeagent.dial_socket import DialSocketServer
from nodeagent.providers import ProviderSet
from tests.support.local_pipes import LocalPipes


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[DialSocketServer]:
    empty = tmp_path / "bin"
    empty.mkdir()
    # The environment's address answers; the PATH inside has no relay tools.
    providers = cast(ProviderSet, LocalPipes(str(empty), addresses=("127.0.0.1",)))
    srv = DialSocketServer(tmp_path / "dial.sock", providers)
    await srv.start()
    yield srv
    await srv.close()
    assert not srv.path.exists()


async def _target(greeting: bytes = b"") -> tuple[asyncio.Server, int, list[bytes]]:
    """Sends ``greeting`` first, then echoes in upper case once the client half-closes."""
    got: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(greeting)
        data = await reader.read()
        got.append(data)
        writer.write(data.upper())
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1], got


def publish(server: DialSocketServer, port: int) -> None:
    """As a service's `port:` does: the direct path is for published ports."""
    cast(LocalPipes, server.providers).ports[port] = f"127.0.0.1:{port}"


async def _open(
    path: Path, port: int, host: str = "127.0.0.1"
) -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    hello = {"workspace": "w", "provider": "local", "host": host, "port": port}
    writer.write(encode(hello))
    return await reader.readline(), reader, writer


async def test_bytes_both_ways_after_the_handshake(server: DialSocketServer) -> None:
    assert server.path.stat().st_mode & 0o777 == 0o600
    target, port, got = await _target(greeting=b"banner first\n")
    publish(server, port)
    payload = os.urandom(2_000_000)
    async with target:
        answer, reader, writer = await _open(server.path, port)
        assert answer == b'{"connected":true}\n'
        writer.write(payload)
        writer.write_eof()
        back = await asyncio.wait_for(reader.read(), 30)
        writer.close()
    assert got == [payload]
    assert back == b"banner first\n" + payload.upper()


async def test_the_relay_inside_when_the_address_refuses(tmp_path: Path) -> None:
    providers = cast(ProviderSet, LocalPipes(os.environ["PATH"], addresses=("127.0.0.2",)))
    srv = DialSocketServer(tmp_path / "dial.sock", providers)
    await srv.start()
    target, port, got = await _target()
    publish(srv, port)
    try:
        async with target:
            answer, reader, writer = await _open(srv.path, port)
            assert answer == b'{"connected":true}\n'
            writer.write(b"through python3 inside")
            writer.write_eof()
            back = await asyncio.wait_for(reader.read(), 30)
            writer.close()
    finally:
        await srv.close()
    assert got == [b"through python3 inside"]
    assert back == b"THROUGH PYTHON3 INSIDE"


async def test_refusals_are_an_answer_and_the_socket_goes_on(server: DialSocketServer) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once closed
    publish(server, port)
    # Refused at the address, and no relay tool inside to try from there.
    answer, _, writer = await _open(server.path, port)
    writer.close()
    assert b'"error"' in answer and b"no python3, bash or nc" in answer
    answer, _, writer = await _open(server.path, 0)
    writer.close()
    assert b"cannot connect to '127.0.0.1' port 0" in answer
    # Not a handshake: the connection closes, the server goes on.
    reader, writer = await asyncio.open_unix_connection(str(server.path))
    writer.write(b"GET / HTTP/1.0\r\n\r\n")
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    target, port, _ = await _target(greeting=b"still here\n")
    publish(server, port)
    async with target:
        answer, reader, writer = await _open(server.path, port)
        assert answer == b'{"connected":true}\n'
        assert await reader.readline() == b"still here\n"
        writer.close()


async def test_a_command_gets_stdin_and_answers_in_frames(server: DialSocketServer) -> None:
    cast(LocalPipes, server.providers).path = os.environ["PATH"]
    reader, writer = await asyncio.open_unix_connection(str(server.path))
    script = "cat; echo to-stderr >&2; exit 3"
    hello = {"workspace": "w", "provider": "local", "argv": ["sh", "-c", script], "env": {}}
    writer.write(encode(hello))
    assert await reader.readline() == b'{"connected":true}\n'
    payload = os.urandom(1_000_000)
    writer.write(payload)
    writer.write_eof()
    frames, got = Frames(), list[tuple[bytes, bytes]]()
    while data := await asyncio.wait_for(reader.read(65536), 30):
        got += frames.feed(data)
    writer.close()
    assert b"".join(p for k, p in got if k == STDOUT) == payload
    assert b"".join(p for k, p in got if k == STDERR) == b"to-stderr\n"
    assert got[-1] == (EXIT, b"3") and frames.pending == 0


async def test_a_command_without_argv_is_refused(server: DialSocketServer) -> None:
    reader, writer = await asyncio.open_unix_connection(str(server.path))
    writer.write(encode({"workspace": "w", "provider": "local", "argv": "ls"}))
    answer = await reader.readline()
    writer.close()
    assert b"names its argv" in answer


async def test_a_terminal_without_numeric_size_is_refused(server: DialSocketServer) -> None:
    reader, writer = await asyncio.open_unix_connection(str(server.path))
    hello = {"workspace": "w", "provider": "local", "argv": ["sh"], "tty": True, "rows": "x"}
    writer.write(encode(hello))
    answer = await reader.readline()
    writer.close()
    assert b"a terminal's rows and cols are numbers" in answer


def test_frames_cut_anywhere() -> None:
    stream = frame(STDOUT, b"out") + frame(STDERR, b"") + frame(EXIT, b"0")
    for cut in range(len(stream) + 1):
        frames = Frames()
        got = [*frames.feed(stream[:cut]), *frames.feed(stream[cut:])]
        assert got == [(STDOUT, b"out"), (STDERR, b""), (EXIT, b"0")]


async def test_a_client_that_can_reach_the_node_side_is_redirected(
    server: DialSocketServer,
) -> None:
    """`redirect`: a published port is answered with where the agent would connect
    (the proxy then opens it through the tunnel's OpenSSH master); another port is
    connected by the agent as usual (here: refused, no relay tools inside)."""
    publish(server, 8080)
    reader, writer = await asyncio.open_unix_connection(str(server.path))
    hello = {"workspace": "w", "provider": "local", "host": "localhost", "port": 8080}
    writer.write(encode({**hello, "redirect": True}))
    assert await reader.readline() == b'{"redirect":["127.0.0.1",8080]}\n'
    assert await reader.read() == b""
    writer.close()
    answer, _, writer = await _open(server.path, 8081)
    writer.close()
    assert b"no python3, bash or nc" in answer


async def test_a_client_that_says_nothing_is_let_go(
    server: DialSocketServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dial_wire, "HANDSHAKE_TIMEOUT", 0.3)
    reader, writer = await asyncio.open_unix_connection(str(server.path))
    assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, no answer
    writer.close()
    with pytest.raises(HandshakeError, match="no handshake line within"):
        a, b = socket.socketpair()
        with a, b:
            a.setblocking(False)
            await dial_wire.read_line(a)  # the other side never writes
