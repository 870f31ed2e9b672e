"""`vendetta ssh-proxy NAME`: the ProxyCommand of `Host NAME.vendetta`.

An SSH server for one client connection, run on the user's own machine over
the client's stdin/stdout. Each session (shell, command, with or without a
PTY) becomes one Connect stream through the coordinator to the workspace.
Authentication is "none": the proxy runs as the user who runs ssh, and reaches
nothing that user could not reach through the coordinator's 0600 socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import threading
from collections.abc import Awaitable, Callable

import asyncssh
import grpc
from asyncssh import SSHTCPSession

from cli import sftp_builtin, sftp_exec, ssh_pipe, ssh_session
from cli.agent_route import Link
from cli.ssh_forward import open_direct
from cli.ssh_listen import Inside, listen, say
from cli.ssh_session import Workdir
from cli.ssh_stdio import StdioTunnel
from cli.terminal import stream
from common.errors import FailedPreconditionError
from common.paths import vendetta_home
from common.rpc_errors import from_rpc_error
from common.ssh_hosts import host_key_path
from vendetta.v1 import common_pb2

Opened = Awaitable[tuple[asyncssh.SSHReader[bytes], asyncssh.SSHWriter[bytes]]]

# Offered to the client: only AES-GCM, so a default OpenSSH client cannot choose
# chacha20-poly1305 or aes-ctr (it prefers both), the slow ones in asyncssh.
_CIPHERS = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com"]

# Bytes of a session's input sent at once (an scp upload): fewer, larger messages
# through the proxy, the coordinator and the agent.
STDIN_CHUNK = 256 * 1024

# OpenSSH's code for "the connection or the remote side failed".
SSH_FAILURE = 255


class _Server(asyncssh.SSHServer):
    """No authentication (see above); forwarding channels go to the workspace."""

    def __init__(
        self,
        workspace: str,
        link: Link,
        handler: Callable[[asyncssh.SSHServerProcess[bytes]], Awaitable[None]],
    ) -> None:
        self.workspace = workspace
        self.link = link
        self.handler = handler
        self.conn: asyncssh.SSHServerConnection | None = None

    def session_requested(self) -> ssh_session.Process:
        return ssh_session.Process(self.handler)

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn

    def begin_auth(self, username: str) -> bool:
        return False

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> Awaitable[SSHTCPSession[bytes]]:
        return open_direct(self.link, self.workspace, dest_host, dest_port)

    def server_requested(self, listen_host: str, listen_port: int) -> Awaitable[Inside | bool]:
        return self._remote(listen_host, listen_port)

    async def _remote(self, host: str, port: int) -> Inside | bool:
        """`ssh -R`: a port on loopback inside, each connection back to the client."""
        conn = self.conn
        if conn is None:
            return False
        bound = [port]

        def opener(orig_host: str, orig_port: int) -> Opened:
            return conn.open_connection(host, bound[0], orig_host, orig_port)

        try:
            inside = await listen(self.link, self.workspace, opener, port=port)
        except Exception as exc:  # the client says the forward failed; this says why
            say(f"cannot listen on port {port} inside workspace {self.workspace!r}: {exc}")
            return False
        bound[0] = inside.get_port()
        return inside

    async def agent_socket(self) -> tuple[str, Inside] | None:
        """`ssh -A`: a socket inside, private to the session's user, reaching the
        client's ssh-agent; None when the client did not ask for it."""
        conn = self.conn
        if conn is None or conn.get_agent_path() is None:
            return None
        path = f"/tmp/vendetta-ssh-{secrets.token_hex(8)}/agent"

        def opener(orig_host: str, orig_port: int) -> Opened:
            return conn.open_agent_connection()

        try:
            return path, await listen(self.link, self.workspace, opener, path=path)
        except Exception as exc:
            say(f"no agent forwarding in workspace {self.workspace!r}: {exc}")
            return None


async def _session(
    server: _Server, workdir: Workdir, process: asyncssh.SSHServerProcess[bytes]
) -> None:
    workspace, link = server.workspace, server.link
    agent: tuple[str, Inside] | None = None
    term = process.get_terminal_type()
    cols, rows, _, _ = process.get_terminal_size()
    # Bounded: a large upload waits for the stream instead of filling memory.
    inputs: asyncio.Queue[common_pb2.AttachInput | None] = asyncio.Queue(maxsize=64)

    async def pump_stdin() -> None:
        while True:
            try:
                data = await process.stdin.read(STDIN_CHUNK)
            except asyncssh.TerminalSizeChanged as change:
                size = common_pb2.TerminalSize(rows=change.height, cols=change.width)
                await inputs.put(common_pb2.AttachInput(resize=size))
                continue
            except (asyncssh.BreakReceived, asyncssh.SignalReceived):
                continue
            if not data:
                await inputs.put(common_pb2.AttachInput(stdin_eof=True))
                return
            await inputs.put(common_pb2.AttachInput(stdin=data))

    # sftp: the client's bytes wait until the image's sftp-server starts (SFTP_READY);
    # without one, the proxy serves them itself (sftp_builtin). Input is read once
    # the session knows its way (the dial socket's path takes it in callbacks).
    sftp = process.subsystem == "sftp"
    reader: asyncio.Task[None] | None = None

    def pump() -> None:
        nonlocal reader
        if reader is None:
            reader = asyncio.create_task(pump_stdin())

    def sftp_out(data: bytes) -> None:
        if reader is None:
            pump()
            data = data[len(ssh_session.SFTP_READY) :]
        process.stdout.write(data)

    try:
        env = ssh_session.env(process)
        folder = await workdir.get()
        argv = ssh_session.argv(process, folder)
        if not process.subsystem and (agent := await server.agent_socket()) is not None:
            env["SSH_AUTH_SOCK"] = agent[0]
        start = common_pb2.AttachStart(
            workspace=workspace,
            argv=argv,
            tty=term is not None,
            size=common_pb2.TerminalSize(rows=rows or 24, cols=cols or 80),
            env=env,
        )
        run = sftp_exec.connect_runner(link, workspace, env)
        # sftp: the probe line first (ssh_session.SFTP_PROBE), then the client's bytes.
        preface = ssh_session.SFTP_PROBE if sftp else b""
        # Through the agent's dial socket where there is a route.
        gate = ssh_session.SFTP_READY if sftp else b""
        piped = await ssh_pipe.run(link, start, process, process.stdout.write, gate, preface)
        if piped is not None:
            code, taken = piped.code, piped.input_taken
        else:
            if preface:
                inputs.put_nowait(common_pb2.AttachInput(stdin=preface))
            if not sftp:
                pump()
            out = sftp_out if sftp else process.stdout.write
            code = await stream(await link.stub(), start, inputs, out, process.stderr.write)
            taken = reader is not None
        # The client's bytes still unread: the proxy's own SFTP server takes them, where
        # the image has no sftp-server, or its commands get no input (QEMU's guest agent).
        if sftp and not taken and code in (sftp_builtin.NO_SERVER, ssh_session.NO_INPUT):
            gets_input = code == sftp_builtin.NO_SERVER
            code = await sftp_builtin.serve(process, run, folder, gets_input=gets_input)
    except grpc.aio.AioRpcError as exc:
        process.stderr.write(f"vendetta: {from_rpc_error(exc)}\r\n".encode())
        code = SSH_FAILURE
    except Exception as exc:  # the session's error must reach the user's terminal
        process.stderr.write(f"vendetta: {exc}\r\n".encode())
        code = SSH_FAILURE
    finally:
        if reader is not None:
            reader.cancel()
        if agent is not None:
            agent[1].close()
    with contextlib.suppress(Exception):
        await process.stdout.drain()
    process.exit(code)


def _splice(sock: socket.socket) -> None:
    """Copy stdin -> sock and sock -> stdout in two threads (stdio may be pipes)."""

    def inbound() -> None:
        with contextlib.suppress(OSError):
            while data := os.read(0, 65536):
                sock.sendall(data)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)

    def outbound() -> None:
        with contextlib.suppress(OSError):
            while data := sock.recv(65536):
                view = memoryview(data)
                while view:
                    view = view[os.write(1, view) :]

    for target in (inbound, outbound):
        threading.Thread(target=target, daemon=True).start()


async def serve(workspace: str) -> None:
    path = host_key_path(vendetta_home())
    try:
        key = asyncssh.read_private_key(path)
    except OSError as exc:
        raise FailedPreconditionError(
            f"no host key for the SSH proxy at {path} ({exc.strerror}): start the "
            "coordinator (`vendetta server start`), which makes it"
        ) from exc
    link = Link()
    workdir = Workdir(link, workspace)
    server = _Server(workspace, link, lambda p: _session(server, workdir, p))
    # OpenSSH's pipes straight into asyncssh's connection; a socket pair and two
    # copying threads where stdio is something else (a terminal, a file).
    sock: socket.socket | None = None
    tunnel: StdioTunnel | tuple[()] = ()
    if StdioTunnel.usable():
        tunnel = StdioTunnel()
    else:
        sock, theirs = socket.socketpair()
        _splice(theirs)
    try:
        conn = await asyncssh.run_server(
            sock,  # None with a tunnel: asyncssh connects through either
            tunnel=tunnel,
            server_factory=lambda: server,
            server_host_keys=[key],
            agent_forwarding=True,
            encoding=None,
            line_editor=False,
            allow_scp=False,
            keepalive_interval=0,
            # OpenSSH's client would pick chacha20-poly1305, which asyncssh runs per
            # packet in Python: AES-GCM (AES-NI) leaves the proxy twice the bandwidth.
            encryption_algs=_CIPHERS,
        )
    except (asyncssh.Error, OSError) as exc:
        # Not an SSH client on the other end (run by hand, or it went away).
        raise FailedPreconditionError(
            f"`vendetta ssh-proxy` speaks SSH on stdin/stdout for `ssh {workspace}.vendetta` "
            f"(see `vendetta ssh-config`); the connection ended: {exc}"
        ) from exc
    try:
        await conn.wait_closed()
    finally:
        await link.close()
