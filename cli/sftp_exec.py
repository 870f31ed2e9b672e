"""How the builtin SFTP server (cli/sftp_builtin.py) runs a command inside:
a Runner (one exec, with optional input), the Connect one, whether input
reaches commands at all, quoting, what `stat` says, and the SFTP status for a
command that failed."""

from __future__ import annotations

import asyncio
import io
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import asyncssh
import grpc
from asyncssh import SFTPAttrs

from cli.agent_route import Link
from cli.terminal import stream
from common.rpc_errors import from_rpc_error
from vendetta.v1 import common_pb2

CHUNK = 256 * 1024
# Sent to `cat` inside: whether a command's input gets there.
PROBE = b"vendetta: does input reach commands inside?"
# Fields of one `stat -c`: mode (hex), size, uid, gid, atime, mtime, links, owner, group.
STAT = "%f %s %u %g %X %Y %h %U %G"
FIELDS = 9


def quote(path: bytes) -> str:
    try:
        text = path.decode()
    except UnicodeDecodeError:
        raise asyncssh.SFTPInvalidFilename("file names must be UTF-8 here") from None
    return shlex.quote(text or ".")


def chmod_line(perms: int, path: str) -> str:
    """chmod to ``perms`` less the umask inside, as open(2) and mkdir(2) do."""
    return f'chmod "$(printf %o $(( {perms & 0o7777} & ~0$(umask) )))" -- {path}'


def attrs_of(fields: list[bytes], names: dict[int, str]) -> SFTPAttrs:
    mode = int(fields[0], 16)
    size, uid, gid, atime, mtime, nlink = (int(f) for f in fields[1:7])
    for key, name in ((uid, fields[7]), (-1 - gid, fields[8])):
        if name != b"UNKNOWN":  # busybox's word for an id without a name: show the id
            names.setdefault(key, name.decode(errors="replace"))
    return SFTPAttrs(size=size, uid=uid, gid=gid, permissions=mode, atime=atime,
                     mtime=mtime, nlink=nlink)  # fmt: skip


# What a command's message says -> the SFTP status (the client prints the status).
_ERRORS: tuple[tuple[str, Callable[[str], asyncssh.SFTPError]], ...] = (
    ("no such file", asyncssh.SFTPNoSuchFile),
    ("permission denied", asyncssh.SFTPPermissionDenied),
    ("operation not permitted", asyncssh.SFTPPermissionDenied),
    ("file exists", asyncssh.SFTPFileAlreadyExists),
    ("directory not empty", asyncssh.SFTPDirNotEmpty),
    ("not a directory", asyncssh.SFTPNotADirectory),
    ("is a directory", asyncssh.SFTPFileIsADirectory),
    ("read-only file system", asyncssh.SFTPWriteProtect),
    ("no space left", asyncssh.SFTPNoSpaceOnFilesystem),
)


@dataclass(frozen=True)
class Ran:
    code: int
    out: bytes
    err: bytes


class Source(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class Sink(Protocol):
    def write(self, data: bytes, /) -> object: ...


class Runner(Protocol):
    """Runs a line for /bin/sh inside, fed ``stdin``; ``stdout`` takes its output."""

    async def __call__(
        self, line: str, stdin: Source | None = None, stdout: Sink | None = None
    ) -> Ran: ...


async def takes_input(run: Runner) -> bool:
    """Whether a command's input reaches it inside (not with QEMU's guest agent)."""
    ran = await run("exec cat", io.BytesIO(PROBE))
    return ran.code == 0 and ran.out == PROBE


def connect_runner(link: Link, workspace: str, env: dict[str, str]) -> Runner:
    """A Runner over Connect streams through the coordinator (one per command)."""

    async def run(line: str, stdin: Source | None = None, stdout: Sink | None = None) -> Ran:
        inputs: asyncio.Queue[common_pb2.AttachInput | None] = asyncio.Queue(maxsize=16)
        out, err = bytearray(), bytearray()

        async def feed() -> None:
            while stdin is not None and (data := stdin.read(CHUNK)):
                await inputs.put(common_pb2.AttachInput(stdin=data))
            await inputs.put(common_pb2.AttachInput(stdin_eof=True))

        # LC_ALL=C: the messages (mapped to statuses by their words) in English.
        start = common_pb2.AttachStart(
            workspace=workspace, argv=["/bin/sh", "-c", line], tty=False,
            env={**env, "LC_ALL": "C"},
        )  # fmt: skip
        feeder = asyncio.create_task(feed())
        try:
            sink = stdout.write if stdout is not None else out.extend
            code = await stream(await link.stub(), start, inputs, sink, err.extend)
        except grpc.aio.AioRpcError as exc:
            raise asyncssh.SFTPFailure(str(from_rpc_error(exc))) from exc
        finally:
            feeder.cancel()
        return Ran(code, bytes(out), bytes(err))

    return run


def error(ran: Ran) -> asyncssh.SFTPError:
    """The SFTP status for a command that failed, by what it said."""
    lines = [s.strip() for s in ran.err.decode(errors="replace").splitlines() if s.strip()]
    message = lines[-1] if lines else f"failed inside the workspace (exit code {ran.code})"
    low = message.lower()
    for words, kind in _ERRORS:
        if words in low:
            return kind(message)
    return asyncssh.SFTPFailure(message)
