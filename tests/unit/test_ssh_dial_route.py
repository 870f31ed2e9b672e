"""`ssh -L` through the proxy's routed path (cli/ssh_forward.py), and a session's
command (cli/ssh_pipe.py): for `ssh -L`, a real asyncssh
client and server, the server opening each direct-tcpip channel as ssh-proxy
does, through the agent's dial socket (nodeagent/dial_socket.py, environment =
this machine) to a TCP server here. The coordinator is a stub answering
DialRoute: its side is tested in the e2e editor tests."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import struct
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, cast

import asyncssh
import grpc
import pytest

from cli import ssh_pipe, ssh_session
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


class _NoAuth(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return False


class _Sessions:
    """An asyncssh server whose sessions run their command as ssh-proxy runs one
    without a terminal (ssh_pipe.run), in `sh -c`, GREETING=hi in its environment;
    where the input was not taken (no route, or a gate never opened), the session
    then answers how many bytes of input are still there."""

    def __init__(self, link: Link, gate: bytes = b"", preface: bytes = b"") -> None:
        self.link, self.gate, self.preface = link, gate, preface
        self.piped: list[ssh_pipe.Piped | None] = []
        self.backlog: list[int] = []  # the channel's write buffer, sampled while behind

    async def handle(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        cols, rows, _, _ = process.get_terminal_size()
        start = common_pb2.AttachStart(
            workspace="w",
            argv=["sh", "-c", process.command or ""],
            env={"GREETING": "hi"},
            tty=process.get_terminal_type() is not None,
            size=common_pb2.TerminalSize(rows=rows, cols=cols),
        )
        sample = asyncio.create_task(self._sample(process))
        try:
            piped = await ssh_pipe.run(
                self.link, start, process, process.stdout.write, self.gate, self.preface
            )
        finally:
            sample.cancel()
        self.piped.append(piped)
        if piped is not None and piped.input_taken:
            process.exit(piped.code)
            return
        left = await process.stdin.read()
        process.stdout.write(f"left {len(left)}\n".encode())
        process.exit(piped.code if piped is not None else 0)

    async def _sample(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        while True:
            self.backlog.append(process.channel.get_write_buffer_size())
            await asyncio.sleep(0.05)

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[asyncssh.SSHClientConnection]:
        key = asyncssh.generate_private_key("ssh-ed25519")
        server = await asyncssh.listen(
            "127.0.0.1", 0, server_host_keys=[key], process_factory=self.handle,
            encoding=None, server_factory=_NoAuth,
        )  # fmt: skip
        try:
            port = server.sockets[0].getsockname()[1]
            async with asyncssh.connect("127.0.0.1", port, known_hosts=None, username="u") as conn:
                yield conn
        finally:
            server.close()


@pytest.fixture
async def dial(tmp_path: Path) -> AsyncIterator[tuple[DialSocketServer, LocalPipes]]:
    inside = LocalPipes(os.environ["PATH"])
    server = DialSocketServer(tmp_path / "dial.sock", cast(ProviderSet, inside))
    await server.start()
    yield server, inside
    await server.close()


def _routed(dial: tuple[DialSocketServer, LocalPipes]) -> Link:
    return Link(stub=cast(Any, _Coordinator(dial[0].path, dial[1])))


async def test_a_session_command_through_the_dial_socket(
    dial: tuple[DialSocketServer, LocalPipes],
) -> None:
    """cli/ssh_pipe.py: what a session without a terminal (scp, sftp-server) runs,
    its input taken from the channel in callbacks."""
    sessions = _Sessions(_routed(dial))
    payload = os.urandom(BIG)
    script = 'sha256sum; echo "$GREETING" >&2; exit 7'
    async with sessions.client() as conn:
        done = await asyncio.wait_for(conn.run(script, input=payload, encoding=None), 60)
    assert done.exit_status == 7
    assert cast(bytes, done.stdout).split()[0].decode() == hashlib.sha256(payload).hexdigest()
    assert done.stderr == b"hi\n"
    assert [p.input_taken for p in sessions.piped if p is not None] == [True]


async def test_no_route_leaves_the_input_to_connect() -> None:
    class _Elsewhere:
        async def DialRoute(self, start: common_pb2.DialStart) -> pb.DialRouteReply:
            raise rpc_error(grpc.StatusCode.FAILED_PRECONDITION, "use Dial")

    sessions = _Sessions(Link(stub=cast(Any, _Elsewhere())))
    async with sessions.client() as conn:
        done = await asyncio.wait_for(conn.run("true", input=b"kept", encoding=None), 60)
    assert sessions.piped == [None]
    assert done.stdout == b"left 4\n"  # untouched, for the Connect stream


async def test_input_waits_for_the_gate(dial: tuple[DialSocketServer, LocalPipes]) -> None:
    """sftp: the input goes in once the command's output begins with the gate (its
    sftp-server runs); a command that ends without it leaves the input whole (for
    the proxy's own SFTP server)."""
    sessions = _Sessions(_routed(dial), gate=b"+")
    async with sessions.client() as conn:
        echoed = await conn.run("printf +; exec cat", input=b"through", encoding=None)
        refused = await conn.run("exit 9", input=b"for the builtin", encoding=None)
    assert (echoed.stdout, echoed.exit_status) == (b"through", 0)
    assert (refused.stdout, refused.exit_status) == (b"left 15\n", 9)
    assert [p.input_taken for p in sessions.piped if p is not None] == [True, False]


async def test_an_sftp_session_reads_the_probe_before_the_clients_bytes(
    dial: tuple[DialSocketServer, LocalPipes],
) -> None:
    """ssh-proxy's sftp line (cli/ssh_session.py) with its probe ahead of the client's
    bytes: this machine's sftp-server answers the client's SSH_FXP_INIT; where the
    provider passes no input (a QEMU guest without python3, here stdin at its end),
    the line ends with NO_INPUT and the client's bytes are left whole."""
    assert Path("/usr/lib/openssh/sftp-server").exists()  # openssh-server's, set up
    sessions = _Sessions(_routed(dial), gate=ssh_session.SFTP_READY, preface=ssh_session.SFTP_PROBE)
    init = struct.pack(">IBI", 5, 1, 3)  # SSH_FXP_INIT, version 3
    line = ssh_session.sftp_line()
    async with sessions.client() as conn:
        served = await conn.create_process(line, encoding=None)
        served.stdin.write(init)  # sftp-server quits at end of file, its answer unsent
        reply = await asyncio.wait_for(served.stdout.readexactly(9), 60)
        served.stdin.write_eof()
        await asyncio.wait_for(served.wait(), 60)
        no_input = await asyncio.wait_for(
            conn.run(f"exec </dev/null; {line}", input=init, encoding=None), 60
        )
    assert (served.exit_status, reply[4:]) == (0, struct.pack(">BI", 2, 3))  # SSH_FXP_VERSION
    assert (no_input.exit_status, no_input.stdout) == (ssh_session.NO_INPUT, b"left 9\n")
    assert [p.input_taken for p in sessions.piped if p is not None] == [True, False]


async def test_a_terminal_session_through_the_dial_socket(
    dial: tuple[DialSocketServer, LocalPipes],
) -> None:
    """`ssh -t`: the command on a terminal inside (here a pseudo-terminal of this
    machine's), its size as the client's, then as the client changes it, typed
    input echoed by the terminal, the exit code passed on."""
    sessions = _Sessions(_routed(dial))
    script = "stty size; read x; stty size; echo got-$x; exit 5"
    async with sessions.client() as conn:
        proc = await conn.create_process(script, term_type="xterm", term_size=(100, 30))
        seen = ""

        async def until(text: str) -> None:
            nonlocal seen
            while text not in seen:
                seen += await asyncio.wait_for(proc.stdout.read(4096), 30)

        await until("30 100")
        proc.change_terminal_size(120, 40)
        await asyncio.sleep(0.2)  # the new size reaches the terminal before the line
        proc.stdin.write("typed\r")
        await until("got-typed")
        await asyncio.wait_for(proc.wait(), 30)
    lines = seen.replace("\r", "").splitlines()
    assert lines[:4] == ["30 100", "typed", "40 120", "got-typed"], lines  # "typed": the echo
    assert proc.exit_status == 5
    assert [p.input_taken for p in sessions.piped if p is not None] == [True]


async def test_an_agent_without_terminals_here_leaves_the_session_to_connect(
    tmp_path: Path,
) -> None:
    """An agent that predates terminals on its dial socket answers a terminal's
    handshake without `"tty": true` (it would run the command on pipes): the proxy
    hangs up before any input and the session goes through Connect."""
    hellos: list[dict[str, Any]] = []
    closed = asyncio.Event()

    async def older_agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hellos.append(json.loads(await reader.readline()))
        writer.write(b'{"connected":true}\n')
        assert await reader.read() == b""  # no input came: the proxy hung up
        closed.set()

    server = await asyncio.start_unix_server(older_agent, str(tmp_path / "old.sock"))
    sessions = _Sessions(Link(stub=cast(Any, _Coordinator(tmp_path / "old.sock", LocalPipes("")))))
    async with server, sessions.client() as conn:
        done = await asyncio.wait_for(conn.run("true", term_type="xterm", input="kept"), 30)
        await asyncio.wait_for(closed.wait(), 30)
    assert hellos[0]["tty"] is True and sessions.piped == [None]
    assert done.stdout == "left 4\n"  # the input untouched, for the Connect stream


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


async def test_a_session_waits_while_the_client_is_behind(
    dial: tuple[DialSocketServer, LocalPipes],
) -> None:
    """The SSH client not reading: the agent's output is no longer read into the
    channel past asyncssh's own backlog, so the command waits (it cannot finish
    while 8 MiB are more than every buffer on the way holds); once the client
    reads again, the rest arrives whole."""
    sessions = _Sessions(_routed(dial))
    async with sessions.client() as conn:
        process = await conn.create_process(f"head -c {BIG} /dev/zero", encoding=None)
        await asyncio.sleep(1.5)  # not reading: the client's window fills, then ours
        still_running = sessions.piped == []
        behind = max(sessions.backlog)
        got = await asyncio.wait_for(process.stdout.read(), 60)
        await process.wait()
    assert still_running, "the whole output was read into the channel"
    assert behind <= ssh_pipe.CHANNEL_BACKLOG + 512 * 1024, behind
    assert len(got) == BIG and process.exit_status == 0


async def test_input_waits_while_the_command_does_not_read(
    dial: tuple[DialSocketServer, LocalPipes],
) -> None:
    """A full socket to the agent stops the channel's input (its window is not
    opened again), so the client waits: the proxy does not take a large upload into
    memory while the command is not reading. Then all of it arrives."""
    huge = 48 * 1024 * 1024  # more than the client's window and every socket buffer
    sessions = _Sessions(_routed(dial))
    async with sessions.client() as conn:
        process = await conn.create_process("sleep 2; wc -c", encoding=None)
        process.stdin.write(bytes(huge))
        try:
            await asyncio.wait_for(process.stdin.drain(), 1)
            took_all = True
        except TimeoutError:
            took_all = False
        process.stdin.write_eof()
        out = await asyncio.wait_for(process.stdout.read(), 60)
    assert not took_all, "the proxy took the whole upload while the command slept"
    assert out.strip() == str(huge).encode()
