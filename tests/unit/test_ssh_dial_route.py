"""`ssh -L` through the proxy's routed path (cli/ssh_forward.py), and a session's
command (cli/ssh_pipe.py): for `ssh -L`, a real asyncssh
client and server, the server opening each direct-tcpip channel as ssh-proxy
does, through the agent's dial socket (nodeagent/dial_socket.py, environment =
this machine) to a TCP server here. The coordinator is a stub answering
DialRoute: its side is tested in the e2e editor tests."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, cast

import asyncssh
import grpc
import pytest

from cli import ssh_pipe
from cli.agent_route import Link
from cli.ssh_forward import open_direct
from nodeagent.dial_socket import DialSocketServer
from nodeagent.providers import ProviderSet
from tests.support.local_pipes import LocalPipes
from tests.support.rpc import rpc_error
from vendetta.v1 import common_pb2
from vendetta.v1 import coordinator_pb2 as pb

BIG = 8 * 1024 * 1024 + 5  # past every window and buffer on the way


class _Coordinator:
    """DialRoute as the coordinator answers it; Dial must not be needed."""

    def __init__(self, socket: Path, inside: LocalPipes, local: bool = False) -> None:
        self.socket = socket
        self.inside = inside
        self.local = local  # the agent runs here: redirected targets are reached from here
        self.routes = 0

    async def DialRoute(self, start: common_pb2.DialStart) -> pb.DialRouteReply:
        self.routes += 1
        self.inside.ports[start.port] = f"127.0.0.1:{start.port}"  # every port published
        routed = common_pb2.DialStart()
        routed.CopyFrom(start)
        routed.provider = "local"
        return pb.DialRouteReply(socket=str(self.socket), start=routed, local=self.local)

    def Dial(self, requests: Any) -> Any:
        raise AssertionError("the routed path fell back to Dial")


class _Proxy(asyncssh.SSHServer):
    def __init__(self, link: Link) -> None:
        self.link = link

    def begin_auth(self, username: str) -> bool:
        return False

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> Awaitable[asyncssh.SSHTCPSession[bytes]]:
        return open_direct(self.link, "w", dest_host, dest_port)


Client = tuple[asyncssh.SSHClientConnection, _Coordinator]


@pytest.fixture
async def client(
    tmp_path: Path,
) -> AsyncIterator[tuple[asyncssh.SSHClientConnection, _Coordinator]]:
    empty = tmp_path / "bin"
    empty.mkdir()  # no relay tools inside: every connection goes straight to the address
    providers = cast(ProviderSet, LocalPipes(str(empty), addresses=("127.0.0.1",)))
    dial = DialSocketServer(tmp_path / "dial.sock", providers)
    await dial.start()
    coordinator = _Coordinator(dial.path, cast(LocalPipes, providers))
    link = Link(stub=cast(Any, coordinator))
    key = asyncssh.generate_private_key("ssh-ed25519")
    server = await asyncssh.listen(
        "127.0.0.1", 0, server_host_keys=[key], server_factory=lambda: _Proxy(link)
    )
    port = server.sockets[0].getsockname()[1]
    conn = await asyncssh.connect("127.0.0.1", port, known_hosts=None, username="u")
    try:
        yield conn, coordinator
    finally:
        conn.close()
        server.close()
        await dial.close()


async def _service(greeting: bytes) -> tuple[asyncio.Server, int, list[str]]:
    """Speaks first, then answers the digest of all it got once the client half-closes."""
    got: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(greeting)
        digest, size = hashlib.sha256(), 0
        while data := await reader.read(1 << 20):
            digest.update(data)
            size += len(data)
        got.append(f"{size} {digest.hexdigest()}")
        writer.write(bytes(BIG))  # and a download past every window
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1], got


async def test_bytes_both_ways_through_the_dial_socket(
    client: Client,
) -> None:
    conn, coordinator = client
    payload = os.urandom(BIG)
    service, port, got = await _service(b"hello first\n")
    async with service:
        reader, writer = await conn.open_connection("127.0.0.1", port)
        assert await reader.readline() == b"hello first\n"
        writer.write(payload)
        writer.write_eof()
        back = await asyncio.wait_for(reader.read(), 60)
        writer.close()
    assert got == [f"{BIG} {hashlib.sha256(payload).hexdigest()}"]
    assert back == bytes(BIG)
    assert coordinator.routes == 1


async def test_a_refused_target_fails_the_channel_with_the_agents_reason(
    client: Client,
) -> None:
    conn, _ = client
    with pytest.raises(asyncssh.ChannelOpenError, match="no python3, bash or nc"):
        await conn.open_connection("127.0.0.1", 9)
    # The connection goes on.
    service, port, _ = await _service(b"still here\n")
    async with service:
        reader, writer = await conn.open_connection("127.0.0.1", port)
        assert await reader.readline() == b"still here\n"
        writer.close()


async def test_a_session_command_through_the_dial_socket(tmp_path: Path) -> None:
    """cli/ssh_pipe.py: what a session without a terminal (scp, sftp-server) runs."""
    inside = LocalPipes(os.environ["PATH"])
    dial = DialSocketServer(tmp_path / "dial.sock", cast(ProviderSet, inside))
    await dial.start()
    link = Link(stub=cast(Any, _Coordinator(dial.path, inside)))
    inputs: asyncio.Queue[common_pb2.AttachInput | None] = asyncio.Queue()
    payload = os.urandom(BIG)
    inputs.put_nowait(common_pb2.AttachInput(stdin=payload))
    inputs.put_nowait(common_pb2.AttachInput(stdin_eof=True))
    out: list[bytes] = []
    err: list[bytes] = []
    script = 'sha256sum; echo "$GREETING" >&2; exit 7'
    start = common_pb2.AttachStart(workspace="w", argv=["sh", "-c", script], env={"GREETING": "hi"})
    try:
        code = await asyncio.wait_for(ssh_pipe.run(link, start, inputs, out.append, err.append), 60)
    finally:
        await dial.close()
    assert code == 7
    assert b"".join(out).split()[0].decode() == hashlib.sha256(payload).hexdigest()
    assert b"".join(err) == b"hi\n"


async def test_no_route_leaves_the_session_to_connect() -> None:
    class _Elsewhere:
        async def DialRoute(self, start: common_pb2.DialStart) -> pb.DialRouteReply:
            raise rpc_error(grpc.StatusCode.FAILED_PRECONDITION, "use Dial")

    inputs: asyncio.Queue[common_pb2.AttachInput | None] = asyncio.Queue()
    inputs.put_nowait(common_pb2.AttachInput(stdin=b"kept"))
    start = common_pb2.AttachStart(workspace="w", argv=["true"])
    link = Link(stub=cast(Any, _Elsewhere()))
    assert await ssh_pipe.run(link, start, inputs, print, print) is None
    assert inputs.qsize() == 1  # untouched, for the Connect stream


async def test_a_redirected_port_is_reached_from_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent on this machine (DialRouteReply.local): for a published port it
    answers where to connect, and the proxy connects itself; the agent never does."""

    async def agent_connects(*args: Any) -> bool:
        raise AssertionError("the agent connected: no redirect")

    monkeypatch.setattr(DialSocketServer, "_direct", agent_connects)
    inside = LocalPipes(str(tmp_path), addresses=("127.0.0.1",))
    dial = DialSocketServer(tmp_path / "dial.sock", cast(ProviderSet, inside))
    await dial.start()
    link = Link(stub=cast(Any, _Coordinator(dial.path, inside, local=True)))
    key = asyncssh.generate_private_key("ssh-ed25519")
    proxy = await asyncssh.listen(
        "127.0.0.1", 0, server_host_keys=[key], server_factory=lambda: _Proxy(link)
    )
    service, port, got = await _service(b"from here\n")
    try:
        async with (
            service,
            asyncssh.connect(
                "127.0.0.1", proxy.sockets[0].getsockname()[1], known_hosts=None, username="u"
            ) as conn,
        ):
            reader, writer = await conn.open_connection("127.0.0.1", port)
            assert await reader.readline() == b"from here\n"
            writer.write(b"up")
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 60) == bytes(BIG)
            writer.close()
    finally:
        proxy.close()
        await dial.close()
    assert got == [f"2 {hashlib.sha256(b'up').hexdigest()}"]


async def test_a_session_waits_while_the_client_is_behind(tmp_path: Path) -> None:
    """``drain`` holding (the SSH client not reading): nothing more is read from the
    agent meanwhile; once it lets go, the rest of the output arrives whole."""
    inside = LocalPipes(os.environ["PATH"])
    dial = DialSocketServer(tmp_path / "dial.sock", cast(ProviderSet, inside))
    await dial.start()
    link = Link(stub=cast(Any, _Coordinator(dial.path, inside)))
    inputs: asyncio.Queue[common_pb2.AttachInput | None] = asyncio.Queue()
    inputs.put_nowait(common_pb2.AttachInput(stdin_eof=True))
    out: list[bytes] = []
    behind, go_on = asyncio.Event(), asyncio.Event()

    async def drain() -> None:
        if not go_on.is_set():
            behind.set()
            await go_on.wait()

    start = common_pb2.AttachStart(workspace="w", argv=["head", "-c", str(BIG), "/dev/zero"])
    run = asyncio.create_task(ssh_pipe.run(link, start, inputs, out.append, print, drain))
    try:
        await asyncio.wait_for(behind.wait(), 30)
        await asyncio.sleep(0.3)  # time to read more, if it would
        held = sum(map(len, out))
        assert 0 < held <= ssh_pipe.CHUNK
        go_on.set()
        assert await asyncio.wait_for(run, 60) == 0
    finally:
        go_on.set()
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        await dial.close()
    assert sum(map(len, out)) == BIG
