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
import socket
import threading

import asyncssh
import grpc

from cli.client import coordinator
from cli.terminal import stream
from common.errors import FailedPreconditionError
from common.paths import vendetta_home
from common.rpc_errors import from_rpc_error
from common.ssh_hosts import host_key_path
from vendetta.v1 import common_pb2

# OpenSSH's code for "the connection or the remote side failed".
SSH_FAILURE = 255


class _NoAuth(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return False


def _argv(process: asyncssh.SSHServerProcess[bytes]) -> list[str]:
    # OpenSSH sends a command line for the remote shell to parse, as sshd does.
    command = process.command
    return ["/bin/sh", "-c", command] if command else []


async def _session(workspace: str, process: asyncssh.SSHServerProcess[bytes]) -> None:
    term = process.get_terminal_type()
    cols, rows, _, _ = process.get_terminal_size()
    start = common_pb2.AttachStart(
        workspace=workspace,
        argv=_argv(process),
        tty=term is not None,
        size=common_pb2.TerminalSize(rows=rows or 24, cols=cols or 80),
        env={"TERM": term} if term else {},
    )
    # Bounded: a large upload waits for the stream instead of filling memory.
    inputs: asyncio.Queue[common_pb2.AttachInput | None] = asyncio.Queue(maxsize=64)

    async def pump_stdin() -> None:
        while True:
            try:
                data = await process.stdin.read(65536)
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

    reader = asyncio.create_task(pump_stdin())
    try:
        async with coordinator() as c:
            code = await stream(c, start, inputs, process.stdout.write, process.stderr.write)
    except grpc.aio.AioRpcError as exc:
        process.stderr.write(f"vendetta: {from_rpc_error(exc)}\r\n".encode())
        code = SSH_FAILURE
    except Exception as exc:  # the session's error must reach the user's terminal
        process.stderr.write(f"vendetta: {exc}\r\n".encode())
        code = SSH_FAILURE
    finally:
        reader.cancel()
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
    ours, theirs = socket.socketpair()
    _splice(theirs)
    path = host_key_path(vendetta_home())
    try:
        key = asyncssh.read_private_key(path)
    except OSError as exc:
        raise FailedPreconditionError(
            f"no host key for the SSH proxy at {path} ({exc.strerror}): start the "
            "coordinator (`vendetta server start`), which makes it"
        ) from exc
    try:
        conn = await asyncssh.run_server(
            ours,
            server_factory=_NoAuth,
            server_host_keys=[key],
            process_factory=lambda p: _session(workspace, p),
            encoding=None,
            line_editor=False,
            allow_scp=False,
            keepalive_interval=0,
        )
    except (asyncssh.Error, OSError) as exc:
        # Not an SSH client on the other end (run by hand, or it went away).
        raise FailedPreconditionError(
            f"`vendetta ssh-proxy` speaks SSH on stdin/stdout for `ssh {workspace}.vendetta` "
            f"(see `vendetta ssh-config`); the connection ended: {exc}"
        ) from exc
    await conn.wait_closed()
