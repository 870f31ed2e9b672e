"""What a session of `ssh NAME.vendetta` runs inside: the command line, the
subsystem (sftp), the environment the client sends, and the folder it starts in.

As sshd does: a command is a line for the shell; no command is a login shell;
`SetEnv`/`SendEnv` of LANG, LC_* and TERM are taken (sshd's usual AcceptEnv),
others dropped. Sessions start in the workspace's working folder (its source,
/workspace by default) where it exists, else where the engine starts them.
The sftp subsystem is the image's own sftp-server, run like any command; an
image without one, or an environment whose commands get no input (QEMU's guest
agent without python3: the sftp line reads a probe line ahead of the client's
bytes, so it learns this in the same command), gets the proxy's own SFTP server
(cli/sftp_builtin.py).
"""

from __future__ import annotations

import inspect
import re
import shlex
from collections.abc import Awaitable, Callable

import asyncssh
from asyncssh.constants import EXTENDED_DATA_STDERR

from cli.agent_route import Link
from vendetta.v1 import coordinator_pb2 as pb

DEFAULT_WORKDIR = "/workspace"
ACCEPT_ENV = re.compile(r"^(LANG|LANGUAGE|LC_[A-Z_]+|TERM|COLORTERM)$")

# Where Debian, Fedora, Alpine and Arch put OpenSSH's sftp-server.
SFTP_SERVERS = (
    "/usr/lib/openssh/sftp-server",
    "/usr/lib/sftp-server",
    "/usr/libexec/openssh/sftp-server",
    "/usr/libexec/sftp-server",
    "/usr/lib/ssh/sftp-server",
)
# Printed just before the image's sftp-server starts: the client's bytes wait for it
# (ssh_proxy), so an image without one ends the command (exit 127) with them unread,
# for the proxy's own server.
SFTP_READY = b"+"
# Sent by the proxy ahead of the client's bytes: the line reads it before anything,
# so a provider that passes commands no input (a QEMU guest without python3) ends
# it with NO_INPUT, the client's bytes unread, for the proxy's own server without
# input. Asked in the same command as the sftp-server's start: no exec of its own.
SFTP_PROBE = b"vendetta-sftp\n"
NO_INPUT = 126
LOGIN = "command -v bash >/dev/null 2>&1 && exec bash -l || exec sh -l"


def sftp_line() -> str:
    """The sftp subsystem's line for /bin/sh: the probe, then the image's sftp-server."""
    tries = " ".join(SFTP_SERVERS)
    ready = SFTP_READY.decode()
    probe = SFTP_PROBE.decode().strip()
    return (
        f'read -r p && [ "$p" = {probe} ] || exit {NO_INPUT}; '
        f'for s in {tries}; do [ -x "$s" ] && printf {ready} && exec "$s"; done; exit 127'
    )


def argv(process: asyncssh.SSHServerProcess[bytes], workdir: str) -> list[str]:
    """The argv inside for this session (a line for /bin/sh, as sshd runs it)."""
    if process.subsystem == "sftp":
        line = sftp_line()
    elif process.subsystem:
        line = f"echo 'vendetta: no subsystem {process.subsystem}' >&2; exit 127"
    else:
        line = process.command or LOGIN
    if workdir:
        # Not there (no source, another image layout): where the engine starts.
        line = f"cd {shlex.quote(workdir)} 2>/dev/null; {line}"
    return ["/bin/sh", "-c", line]


def env(process: asyncssh.SSHServerProcess[bytes]) -> dict[str, str]:
    sent = {
        str(k): str(v)
        for k, v in process.env.items()
        if isinstance(k, str) and isinstance(v, str) and ACCEPT_ENV.match(k)
    }
    term = process.get_terminal_type()
    if term:
        sent["TERM"] = term
    return sent


class Workdir:
    """The workspace's working folder, asked of the coordinator once per connection."""

    def __init__(self, link: Link, workspace: str) -> None:
        self.link = link
        self.workspace = workspace
        self._value: str | None = None

    async def get(self) -> str:
        if self._value is None:
            stub = await self.link.stub()
            ws = await stub.GetWorkspace(pb.GetWorkspaceRequest(name=self.workspace))
            self._value = ws.source.workdir or DEFAULT_WORKDIR
        return self._value


class Process(asyncssh.SSHServerProcess[bytes]):
    """A session whose every request, subsystems too, runs through ``handler``.

    asyncssh answers the sftp subsystem with its own SFTP server (on the proxy's
    machine): here it is the workspace's sftp-server, run as any command (or
    sftp_builtin's, whose every operation is inside).
    """

    def __init__(
        self, handler: Callable[[asyncssh.SSHServerProcess[bytes]], Awaitable[None]]
    ) -> None:
        super().__init__(handler, None, 0, False)

    def subsystem_requested(self, subsystem: str) -> bool:
        return True  # an unknown one gets a message and exit 127 from `argv`

    def session_started(self) -> None:
        chan = self._chan
        stdin = asyncssh.SSHReader[bytes](self, chan)
        stdout = asyncssh.SSHWriter[bytes](self, chan)
        stderr = asyncssh.SSHWriter[bytes](self, chan, EXTENDED_DATA_STDERR)
        handler = self._start_process(stdin, stdout, stderr)
        if inspect.isawaitable(handler) and self._conn is not None:
            self._conn.create_task(handler, stdin.logger)
