"""SFTP for images without an sftp-server: the proxy serves the protocol itself
(asyncssh's SFTP server machinery) and performs each operation inside the
environment through exec, as the workspace's user, with the commands busybox
has (`stat -c`, `cat`, `mv`, `rm`, `mkdir`, `readlink`, `ln`, `chmod`, `touch`).

A file is spooled here: read with one `cat` at open, written back with one
`cat >` whose stdin is the data at close, so a transfer costs a few execs
whatever its size. Where commands inside get no input (QEMU's guest agent
takes none; asked once per session), the data goes in the command lines
instead, base64 in slices, into a file in /tmp that is then copied over the
target: slower, but never a file emptied by input that went nowhere.
Refusals are the environment's own: the command's message ("Permission
denied", "No such file or directory") becomes the SFTP status.
Paths from the client are quoted; relative ones start in the session's folder
(the workspace's workdir), as sftp-server's start in the user's home.
"""

from __future__ import annotations

import asyncio
import base64
import io
import posixpath
import shlex
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import IO, Protocol

import asyncssh
import grpc
from asyncssh import SFTPAttrs, SFTPName
from asyncssh.sftp import run_sftp_server

from cli.ssh_forward import Link
from cli.terminal import stream
from common.rpc_errors import from_rpc_error
from vendetta.v1 import common_pb2

# The sftp session's exit code when the image has none (ssh_session's line).
NO_SERVER = 127
CHUNK = 256 * 1024
# Sent to `cat` inside: whether a command's input gets there.
PROBE = b"vendetta: does input reach commands inside?"
# Bytes per command when the data goes in the command line: base64 of it (88 KiB)
# stays under Linux's 128 KiB for one argument, with room for the wrapping.
ARG_SLICE = 64 * 1024
# Fields of one `stat -c`: mode (hex), size, uid, gid, atime, mtime, links, owner, group.
STAT = "%f %s %u %g %X %Y %h %U %G"
_FIELDS = 9

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


class Runner(Protocol):
    """Runs a line for /bin/sh inside, fed ``stdin``; ``stdout`` takes its output."""

    async def __call__(
        self, line: str, stdin: IO[bytes] | None = None, stdout: IO[bytes] | None = None
    ) -> Ran: ...


def connect_runner(link: Link, workspace: str, env: dict[str, str]) -> Runner:
    """A Runner over Connect streams through the coordinator (one per command)."""

    async def run(
        line: str, stdin: IO[bytes] | None = None, stdout: IO[bytes] | None = None
    ) -> Ran:
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


def _q(path: bytes) -> str:
    try:
        text = path.decode()
    except UnicodeDecodeError:
        raise asyncssh.SFTPInvalidFilename("file names must be UTF-8 here") from None
    return shlex.quote(text or ".")


def _mode(perms: int, path: str) -> str:
    """chmod to ``perms`` less the umask inside, as open(2) and mkdir(2) do."""
    return f'chmod "$(printf %o $(( {perms & 0o7777} & ~0$(umask) )))" -- {path}'


def _attrs(fields: list[bytes], names: dict[int, str]) -> SFTPAttrs:
    mode = int(fields[0], 16)
    size, uid, gid, atime, mtime, nlink = (int(f) for f in fields[1:7])
    for key, name in ((uid, fields[7]), (-1 - gid, fields[8])):
        if name != b"UNKNOWN":  # busybox's word for an id without a name: show the id
            names.setdefault(key, name.decode(errors="replace"))
    return SFTPAttrs(size=size, uid=uid, gid=gid, permissions=mode, atime=atime,
                     mtime=mtime, nlink=nlink)  # fmt: skip


class File:
    """An open file: its content spooled here; written back at close if changed."""

    def __init__(self, path: bytes, writable: bool, append: bool) -> None:
        self.path = path
        self.writable = writable
        self.append = append
        self.dirty = False
        self.spool: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 (closed at close)
        self.later: SFTPAttrs | None = None  # fsetstat of a file being written
        # Opened to write only, without truncating: the file's own bytes are fetched
        # when needed (not when the client writes it all and truncates, as scp does);
        # till then the spool holds exactly what was written from its start.
        self.base = False
        self.covered = 0

    def seek(self, offset: int, whence: int = 0) -> int:  # asyncssh's ranges request
        return self.spool.seek(offset, whence)


class Inside:
    """The file operations, each one command inside."""

    def __init__(self, run: Runner, workdir: str) -> None:
        self.run = run
        self.workdir = workdir
        self._takes_input: bool | None = None

    async def sh(
        self, script: str, stdin: IO[bytes] | None = None, stdout: IO[bytes] | None = None
    ) -> bytes:
        line = f"cd {shlex.quote(self.workdir)} 2>/dev/null; {script}" if self.workdir else script
        ran = await self.run(line, stdin, stdout)
        if ran.code != 0:
            raise error(ran)
        return ran.out

    async def stat(self, path: bytes, follow: bool, names: dict[int, str]) -> SFTPAttrs:
        out = await self.sh(f"stat {'-L ' if follow else ''}-c '{STAT}' -- {_q(path)}")
        return _attrs(out.split()[:_FIELDS], names)

    async def listdir(self, path: bytes, names: dict[int, str]) -> list[SFTPName]:
        """One command: the names (NUL-ended, an empty one last), then one `stat`
        line each, the name last (a name that vanished in between is skipped)."""
        out = await self.sh(
            f"cd -P -- {_q(path)} || exit 1; set -- . ..; for f in .* *; do case $f in "
            '.|..) ;; *) if [ -e "$f" ] || [ -L "$f" ]; then set -- "$@" "$f"; fi;; esac; '
            f"done; printf '%s\\0' \"$@\"; printf '\\0'; stat -c '{STAT} %n' -- \"$@\" || :"
        )
        listed, _, stats = out.partition(b"\0\0")
        result: list[SFTPName] = []
        for name in listed.split(b"\0"):
            fields = stats.split(b" ", _FIELDS)
            if len(fields) > _FIELDS and fields[_FIELDS].startswith(name + b"\n"):
                result.append(SFTPName(name, attrs=_attrs(fields[:_FIELDS], names)))
                stats = fields[_FIELDS][len(name) + 1 :]
        return result

    async def realpath(self, path: bytes) -> bytes:
        p = _q(path)
        # A folder: its physical path; a link: where it ends; else (maybe not there
        # yet, as sftp-server allows) the folder's path and the name.
        out = await self.sh(
            f"if [ -d {p} ]; then cd -P -- {p} && pwd -P; elif [ -L {p} ] && readlink -f -- {p}"
            f' 2>/dev/null; then :; else cd -P -- "$(dirname -- {p})" && pwd -P && basename -- '
            f"{p}; fi"
        )
        parts = out.decode(errors="surrogateescape").rstrip("\n").split("\n", 1)
        return posixpath.normpath(posixpath.join(*parts)).encode(errors="surrogateescape")

    async def open(self, path: bytes, pflags: int, attrs: SFTPAttrs) -> File:
        p = _q(path)
        write = bool(pflags & asyncssh.FXF_WRITE)
        f = File(path, write, bool(pflags & asyncssh.FXF_APPEND))
        steps = []
        if write and pflags & asyncssh.FXF_CREAT and pflags & asyncssh.FXF_EXCL:
            steps.append(
                f"if [ -e {p} ] || [ -L {p} ]; then echo {p}': File exists' >&2; exit 1; fi"
            )
        elif write and not pflags & asyncssh.FXF_CREAT:
            steps.append(f"[ -e {p} ] || {{ echo {p}': No such file or directory' >&2; exit 1; }}")
        if write:
            steps.append(f"new=; [ -e {p} ] || new=1; true >> {p} || exit 1")
            if attrs.permissions is not None:
                steps.append(f'if [ -n "$new" ]; then {_mode(attrs.permissions, p)}; fi')
            if pflags & asyncssh.FXF_TRUNC:
                steps.append(f"true > {p} || exit 1")
        f.base = write and not pflags & (
            asyncssh.FXF_READ | asyncssh.FXF_TRUNC | asyncssh.FXF_APPEND
        )
        if not (write and pflags & asyncssh.FXF_TRUNC) and not f.base:
            steps.append(f"exec cat -- {p}")
        try:
            await self.sh("; ".join(steps), stdout=f.spool)
        except BaseException:
            f.spool.close()
            raise
        return f

    async def fill(self, f: File) -> None:
        """The file's own bytes past what was written from its start, if not yet."""
        if not f.base:
            return
        f.base = False
        with tempfile.TemporaryFile() as base:
            await self.sh(f"exec cat -- {_q(f.path)}", stdout=base)
            base.seek(f.covered)
            f.spool.seek(f.covered)
            shutil.copyfileobj(base, f.spool)

    async def close(self, f: File) -> None:
        try:
            if f.dirty:
                await self.fill(f)
                f.spool.seek(0)
                await self.write_back(f.path, f.spool)
            if f.later is not None:
                await self.setstat(f.path, f.later)
        finally:
            f.spool.close()

    async def write_back(self, path: bytes, data: IO[bytes]) -> None:
        """``data`` becomes the file's content (its inode, mode and owner stay)."""
        if self._takes_input is None:
            ran = await self.run("exec cat", io.BytesIO(PROBE))
            self._takes_input = ran.code == 0 and ran.out == PROBE
        if self._takes_input:
            await self.sh(f"exec cat > {_q(path)}", stdin=data)
            return
        part = (await self.sh("exec mktemp")).strip().decode()
        try:
            into = ">"
            while True:
                piece = data.read(ARG_SLICE)
                if into == ">>" and not piece:
                    break
                encoded = base64.b64encode(piece).decode()
                await self.sh(f"printf %s {encoded} | base64 -d {into} {shlex.quote(part)}")
                into = ">>"
            await self.sh(f"cat -- {shlex.quote(part)} > {_q(path)}")
        finally:
            await self.run(f"rm -f -- {shlex.quote(part)}")

    async def setstat(self, path: bytes, attrs: SFTPAttrs) -> None:
        p = _q(path)
        steps = []
        if attrs.size is not None:
            steps.append(f"truncate -s {int(attrs.size)} -- {p}")
        if attrs.permissions is not None:
            steps.append(f"chmod {attrs.permissions & 0o7777:o} -- {p}")
        if attrs.uid is not None and attrs.gid is not None:
            steps.append(f"chown {int(attrs.uid)}:{int(attrs.gid)} -- {p}")
        if attrs.mtime is not None:
            steps.append(f"touch -c -m -d @{int(attrs.mtime)} -- {p}")
        if attrs.atime is not None:
            steps.append(f"touch -c -a -d @{int(attrs.atime)} -- {p}")
        if steps:
            await self.sh(" && ".join(steps))


class Server(asyncssh.SFTPServer):
    """asyncssh's SFTP server with every operation inside (nothing here is local
    but the spool): what the base class would do on this machine is overridden."""

    def __init__(self, chan: asyncssh.SSHServerChannel[bytes], inside: Inside) -> None:
        super().__init__(chan)
        self.inside = inside
        self.names: dict[int, str] = {}  # uid -> name, -1-gid -> group, as `stat` said

    def format_user(self, uid: int | None) -> str:
        return self.names.get(uid, str(uid)) if uid is not None else ""

    def format_group(self, gid: int | None) -> str:
        return self.names.get(-1 - gid, str(gid)) if gid is not None else ""

    async def stat(self, path: bytes) -> SFTPAttrs:
        return await self.inside.stat(path, True, self.names)

    async def lstat(self, path: bytes) -> SFTPAttrs:
        return await self.inside.stat(path, False, self.names)

    async def fstat(self, file_obj: object) -> SFTPAttrs:
        f = _file(file_obj)
        attrs = await self.inside.stat(f.path, True, self.names)
        if f.writable:  # what the client wrote, not yet there
            size = f.spool.seek(0, 2)
            attrs.size = max(size, attrs.size or 0) if f.base else size
        return attrs

    async def scandir(self, path: bytes) -> AsyncIterator[SFTPName]:
        for name in await self.inside.listdir(path, self.names):
            yield name

    async def realpath(self, path: bytes) -> bytes:
        return await self.inside.realpath(path)

    async def open(self, path: bytes, pflags: int, attrs: SFTPAttrs) -> File:
        return await self.inside.open(path, pflags, attrs)

    def open56(self, path: bytes, desired_access: int, flags: int, attrs: SFTPAttrs) -> File:
        raise asyncssh.SFTPOpUnsupported("SFTP version 3 only")

    async def read(self, file_obj: object, offset: int, size: int) -> bytes:
        f = _file(file_obj)
        await self.inside.fill(f)
        f.spool.seek(offset)
        return f.spool.read(size)

    async def write(self, file_obj: object, offset: int, data: bytes) -> int:
        f = _file(file_obj)
        if not f.writable:
            raise asyncssh.SFTPPermissionDenied("file not opened for writing")
        if offset > f.covered:
            await self.inside.fill(f)  # a gap: what was there shows through
        f.covered = max(f.covered, offset + len(data))
        f.spool.seek(0 if f.append else offset, 2 if f.append else 0)
        f.dirty = True
        return f.spool.write(data)

    async def close(self, file_obj: object) -> None:
        await self.inside.close(_file(file_obj))

    async def setstat(self, path: bytes, attrs: SFTPAttrs) -> None:
        await self.inside.setstat(path, attrs)

    async def lsetstat(self, path: bytes, attrs: SFTPAttrs) -> None:
        await self.inside.setstat(path, attrs)

    async def fsetstat(self, file_obj: object, attrs: SFTPAttrs) -> None:
        f = _file(file_obj)
        if not f.writable:
            await self.inside.setstat(f.path, attrs)
            return
        if attrs.size is not None:
            if attrs.size > f.covered:
                await self.inside.fill(f)
            f.base = False  # nothing of the file's own past the size
            f.spool.truncate(attrs.size)
            f.dirty = True
            attrs.size = None
        f.later = attrs  # after the write-back at close, which would change the times

    async def remove(self, path: bytes) -> None:
        await self.inside.sh(f"rm -- {_q(path)} </dev/null")

    async def mkdir(self, path: bytes, attrs: SFTPAttrs) -> None:
        p = _q(path)
        mode = f" && {_mode(attrs.permissions, p)}" if attrs.permissions is not None else ""
        await self.inside.sh(f"mkdir -- {p}{mode}")

    async def rmdir(self, path: bytes) -> None:
        await self.inside.sh(f"rmdir -- {_q(path)}")

    async def rename(self, oldpath: bytes, newpath: bytes) -> None:
        new = _q(newpath)
        await self.inside.sh(f"if [ -e {new} ] || [ -L {new} ]; then echo {new}': File exists' "
                             f">&2; exit 1; fi; mv -- {_q(oldpath)} {new}")  # fmt: skip

    async def posix_rename(self, oldpath: bytes, newpath: bytes) -> None:
        old, new = _q(oldpath), _q(newpath)
        # rename(2): over a file or an empty folder, never into a folder (as mv would).
        await self.inside.sh(f"if [ -d {new} ] && [ ! -L {new} ]; then [ -d {old} ] && rmdir -- "
                             f"{new} || exit 1; fi; mv -f -- {old} {new}")  # fmt: skip

    async def readlink(self, path: bytes) -> bytes:
        p = _q(path)
        out = await self.inside.sh(
            f"if [ -L {p} ]; then exec readlink -- {p}; elif [ -e {p} ]; then "
            f"echo {p}': Invalid argument' >&2; else echo {p}': No such file or directory' >&2; "
            "fi; exit 1"
        )
        return out[:-1] if out.endswith(b"\n") else out

    async def symlink(self, oldpath: bytes, newpath: bytes) -> None:
        await self.inside.sh(f"ln -s -- {_q(oldpath)} {_q(newpath)}")

    async def link(self, oldpath: bytes, newpath: bytes) -> None:
        await self.inside.sh(f"ln -- {_q(oldpath)} {_q(newpath)}")

    def statvfs(self, path: bytes) -> asyncssh.SFTPVFSAttrs:
        raise asyncssh.SFTPOpUnsupported("statvfs not supported")

    def fstatvfs(self, file_obj: object) -> asyncssh.SFTPVFSAttrs:
        raise asyncssh.SFTPOpUnsupported("fstatvfs not supported")

    def fsync(self, file_obj: object) -> None:
        pass  # the data goes inside at close


def _file(file_obj: object) -> File:
    if not isinstance(file_obj, File):
        raise asyncssh.SFTPInvalidHandle("not a file handle")
    return file_obj


class _Exits(asyncssh.SSHWriter[bytes]):
    """The session's output, whose close (the SFTP handler's, at the end) sends
    the exit status first: OpenSSH's scp fails a session that ends without one."""

    def __init__(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        super().__init__(process, process.channel)
        self.process = process

    def close(self) -> None:
        self.process.exit(0)


async def serve(process: asyncssh.SSHServerProcess[bytes], run: Runner, workdir: str) -> int:
    """Serve the session's SFTP here until the client ends it; its exit code."""
    server = Server(process.channel, Inside(run, workdir))
    await run_sftp_server(server, process.stdin, _Exits(process), 3)
    return 0
