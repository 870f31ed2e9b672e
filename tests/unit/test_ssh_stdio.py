"""The SSH proxy's connection on two pipes (cli/ssh_stdio.py), as OpenSSH runs a
ProxyCommand: a real asyncssh server and client, each on its own pair of pipes."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import asyncssh
import pytest

from cli.ssh_stdio import StdioTunnel
from common.pipes import PIPE_SIZE

Pair = tuple[asyncssh.SSHServerConnection, asyncssh.SSHClientConnection]
BIG = 4 * 1024 * 1024 + 17  # past every window and buffer on the way, not a multiple of them


class _Open(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return False  # no authentication: the test is about the byte path


async def _sha_of_stdin(process: asyncssh.SSHServerProcess[bytes]) -> None:
    """Echo the first line back, then answer the digest and size of the rest."""
    line = await process.stdin.readline()
    process.stdout.write(line)
    digest, size = hashlib.sha256(), 0
    while data := await process.stdin.read(65536):
        digest.update(data)
        size += len(data)
    process.stdout.write(f"{size} {digest.hexdigest()}\n".encode())
    process.exit(0)


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    """Server on pipes (client -> server, server -> client), client on the other ends."""
    c2s_r, c2s_w = os.pipe()
    s2c_r, s2c_w = os.pipe()
    key = asyncssh.generate_private_key("ssh-ed25519")

    async def serve() -> asyncssh.SSHServerConnection:
        return await asyncssh.run_server(
            None,  # as the proxy: no socket, the tunnel carries it
            tunnel=StdioTunnel(c2s_r, s2c_w),
            server_factory=_Open,
            server_host_keys=[key],
            process_factory=_sha_of_stdin,
            encoding=None,
        )

    server_task = asyncio.create_task(serve())
    client = await asyncssh.connect(
        "proxy", tunnel=StdioTunnel(s2c_r, c2s_w), known_hosts=None, username="u"
    )
    server = await server_task
    for fd in (c2s_r, c2s_w, s2c_r, s2c_w):
        os.close(fd)  # the transports hold their own copies
    try:
        yield server, client
    finally:
        client.close()
        server.close()
        await asyncio.gather(client.wait_closed(), server.wait_closed())


async def test_bytes_cross_both_ways_whole(
    pair: Pair,
) -> None:
    _, client = pair
    payload = os.urandom(BIG)
    result = await client.run(input=b"hello\n" + payload, encoding=None, timeout=60)
    assert result.exit_status == 0
    assert isinstance(result.stdout, bytes)
    first, rest = result.stdout.split(b"\n", 1)
    assert first == b"hello"
    assert rest.decode().split() == [str(BIG), hashlib.sha256(payload).hexdigest()]


async def test_the_client_going_away_ends_the_server_connection(
    pair: Pair,
) -> None:
    server, client = pair
    client.abort()  # closes its pipe ends, as a killed ssh client's would close
    await asyncio.wait_for(server.wait_closed(), 10)


def test_only_pipes_and_sockets_are_taken(tmp_path: Path) -> None:
    r, w = os.pipe()
    path = tmp_path / "f"
    path.write_bytes(b"")
    with path.open("rb") as f:
        try:
            assert StdioTunnel.usable(r, w)
            # A regular file (stdin redirected by hand) goes the socket-pair way.
            assert not StdioTunnel.usable(f.fileno(), w)
            # A terminal too: asyncio would leave it non-blocking for the user's shell.
            if os.path.exists("/dev/tty") and os.isatty(0):
                assert not StdioTunnel.usable(0, w)
            assert not StdioTunnel.usable(999_999, w)  # closed or never open
        finally:
            os.close(r)
            os.close(w)


class _Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.events: list[str] = []

    def pause_writing(self) -> None:
        self.events.append("pause")

    def resume_writing(self) -> None:
        self.events.append("resume")


async def test_a_full_pipe_holds_the_connection_back_and_pipes_are_wide() -> None:
    """The client not reading: the connection is told to stop writing (asyncssh then
    stops reading its channels' sources), and told to go on once the pipe drains.
    Both pipes hold 1 MiB (fewer wake-ups of OpenSSH and the proxy)."""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    recorder = _Recorder()
    transport, _ = await StdioTunnel(in_r, out_w).create_connection(lambda: recorder, "", 0)
    try:
        for fd in (in_r, out_w):
            assert fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) == PIPE_SIZE
        transport.write(bytes(4 * PIPE_SIZE))  # 1 MiB fits in the pipe, the rest waits
        assert recorder.events == ["pause"]
        os.set_blocking(out_r, False)
        drained = 0
        while drained < 4 * PIPE_SIZE:
            try:
                drained += len(os.read(out_r, PIPE_SIZE))
            except BlockingIOError:
                await asyncio.sleep(0.01)
        assert recorder.events == ["pause", "resume"]
    finally:
        transport.close()
        for fd in (in_r, in_w, out_r, out_w):
            os.close(fd)
