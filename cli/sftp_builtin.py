"""SFTP for images without an sftp-server: the proxy serves the protocol itself
(asyncssh's SFTP server machinery) and performs each operation inside the
environment through exec, as the workspace's user, with the commands busybox
has (`stat -c`, `cat`, `mv`, `rm`, `mkdir`, `readlink`, `ln`, `chmod`, `touch`).

A file is spooled here (cli/sftp_files.py): read with one `cat` at open;
written back with one `cat >` whose stdin is the file's content inside at
close with the ranges the client wrote over it (so another handle's writes,
or the workspace's, elsewhere in the file stay), so a transfer costs a few
execs whatever its size. Where commands inside get no input (QEMU's guest
agent takes none; asked once per session), the data goes in the command lines
instead, base64 in slices, into a file in /tmp that is then copied over the
target: slower, but never a file emptied by input that went nowhere; and
files are read in slices, under what the agent keeps of a command's output.
Refusals are the environment's own: the command's message ("Permission
denied", "No such file or directory") becomes the SFTP status.
Paths from the client are quoted; relative ones start in the session's folder
(the workspace's workdir), as sftp-server's start in the user's home.
"""

from __future__ import annotations

import base64
import contextlib
import posixpath
import shlex
from collections.abc import AsyncIterator

import asyncssh
from asyncssh import SFTPAttrs, SFTPName
from asyncssh.sftp import run_sftp_server

from cli.sftp_exec import (
    FIELDS,
    STAT,
    Runner,
    Sink,
    Source,
    attrs_of,
    chmod_line,
    error,
    quote,
    takes_input,
)
from cli.sftp_files import File, Spool

# The sftp session's exit code when the image has none (ssh_session's line).
NO_SERVER = 127
# Bytes per command when the data goes in the command line: base64 of it (88 KiB)
# stays under Linux's 128 KiB for one argument, with room for the wrapping.
ARG_SLICE = 64 * 1024
# Where commands get no input, files are read in slices of 2 MiB: libvirt passes
# a guest agent's answer (the output base64'd, in JSON) only up to 4 MiB (measured:
# 1 MiB of output passes, 3 MiB fails with "Unable to encode message payload").
MIB = 1024 * 1024
READ_MIBS = 2


class Inside:
    """The file operations, each one command inside."""

    def __init__(self, run: Runner, workdir: str, gets_input: bool | None = None) -> None:
        self.run = run
        self.workdir = workdir
        self._gets_input = gets_input  # None: asked when first needed

    async def sh(
        self, script: str, stdin: Source | None = None, stdout: Sink | None = None
    ) -> bytes:
        line = f"cd {shlex.quote(self.workdir)} 2>/dev/null; {script}" if self.workdir else script
        ran = await self.run(line, stdin, stdout)
        if ran.code != 0:
            raise error(ran)
        return ran.out

    async def gets_input(self) -> bool:
        if self._gets_input is None:
            self._gets_input = await takes_input(self.run)
        return self._gets_input

    async def stat(self, path: bytes, follow: bool, names: dict[int, str]) -> SFTPAttrs:
        out = await self.sh(f"stat {'-L ' if follow else ''}-c '{STAT}' -- {quote(path)}")
        return attrs_of(out.split()[:FIELDS], names)

    async def listdir(self, path: bytes, names: dict[int, str]) -> list[SFTPName]:
        """One command: the names (NUL-ended, an empty one last), then one `stat`
        line each, the name last (a name that vanished in between is skipped)."""
        out = await self.sh(
            f"cd -P -- {quote(path)} || exit 1; set -- . ..; for f in .* *; do case $f in "
            '.|..) ;; *) if [ -e "$f" ] || [ -L "$f" ]; then set -- "$@" "$f"; fi;; esac; '
            f"done; printf '%s\\0' \"$@\"; printf '\\0'; stat -c '{STAT} %n' -- \"$@\" || :"
        )
        listed, _, stats = out.partition(b"\0\0")
        result: list[SFTPName] = []
        for name in listed.split(b"\0"):
            fields = stats.split(b" ", FIELDS)
            if len(fields) > FIELDS and fields[FIELDS].startswith(name + b"\n"):
                result.append(SFTPName(name, attrs=attrs_of(fields[:FIELDS], names)))
                stats = fields[FIELDS][len(name) + 1 :]
        return result

    async def realpath(self, path: bytes) -> bytes:
        p = quote(path)
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
        p = quote(path)
        write = bool(pflags & asyncssh.FXF_WRITE)
        trunc = write and bool(pflags & asyncssh.FXF_TRUNC)
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
                steps.append(f'if [ -n "$new" ]; then {chmod_line(attrs.permissions, p)}; fi')
            if trunc:
                steps.append(f"true > {p} || exit 1")
            if pflags & asyncssh.FXF_READ:
                steps.append(f"[ -r {p} ] || {{ echo {p}': Permission denied' >&2; exit 1; }}")
            await self.sh("; ".join(steps))
        f = File(path, write, bool(pflags & asyncssh.FXF_APPEND), trunc)
        if not write:
            try:
                await self.fetch(path, f.spool)
            except BaseException:
                f.spool.close()
                raise
        return f

    async def fetch(self, path: bytes, into: Spool) -> None:
        """The file's content inside, now, appended to ``into``."""
        p = quote(path)
        if await self.gets_input():
            await self.sh(f"exec cat -- {p}", stdout=into)
            return
        # In slices (see READ_MIBS); a failing dd's message is cat's.
        skip = 0
        while True:
            before = into.end()
            await self.sh(
                f"dd if={p} bs={MIB} skip={skip} count={READ_MIBS} 2>/dev/null || "
                f"{{ cat -- {p} >/dev/null; exit 1; }}",
                stdout=into,
            )
            if into.end() - before < READ_MIBS * MIB:
                return
            skip += READ_MIBS

    async def content(self, f: File) -> Spool:
        """What ``f`` is to hold: the file's content inside now, what was written
        over it (a new spool), or the spool itself once it is all of it."""
        if f.whole:
            return f.spool
        built = Spool()
        try:
            await self.fetch(f.path, built)
            f.overlay(built)
        except BaseException:
            built.close()
            raise
        return built

    async def fill(self, f: File) -> None:
        """For reads: the rest of the file's bytes around what was written."""
        if not f.filled:
            built = await self.content(f)
            f.spool.close()
            f.spool, f.filled = built, True

    async def flush(self, f: File) -> None:
        """What was written goes inside (at close and fsync)."""
        changes = f.changes
        if f.tail:  # what is appended meanwhile waits in a new spool
            sending, f.spool = f.spool, Spool()
            try:
                sending.seek(0)
                await self.write_back(f.path, sending, ">>")
            except BaseException:
                f.spool.copy(sending, 0, f.spool.end(), sending.end())
                f.spool.close()
                f.spool = sending
                raise
            sending.close()
            f.dirty = f.changes != changes
            return
        built = await self.content(f)
        if built is not f.spool:
            f.spool.close()
            f.spool = built
        f.spool.seek(0)
        await self.write_back(f.path, f.spool, ">")
        if f.changes == changes:  # else written meanwhile: all goes again
            f.sent()

    async def close(self, f: File) -> None:
        try:
            if f.dirty:
                await self.flush(f)
            if f.later is not None:
                await self.setstat(f.path, f.later)
        finally:
            f.spool.close()

    async def write_back(self, path: bytes, data: Source, into: str = ">") -> None:
        """``data`` becomes the file's content (``into`` ">"), or goes at its end
        (">>"); its inode, mode and owner stay."""
        if await self.gets_input():
            await self.sh(f"exec cat {into} {quote(path)}", stdin=data)
            return
        part = (await self.sh("exec mktemp")).strip().decode()
        try:
            to = ">"
            while True:
                piece = data.read(ARG_SLICE)
                if to == ">>" and not piece:
                    break
                encoded = base64.b64encode(piece).decode()
                await self.sh(f"printf %s {encoded} | base64 -d {to} {shlex.quote(part)}")
                to = ">>"
            await self.sh(f"cat -- {shlex.quote(part)} {into} {quote(path)}")
        finally:
            with contextlib.suppress(Exception):  # never in place of the error
                await self.run(f"rm -f -- {shlex.quote(part)}")

    async def setstat(self, path: bytes, attrs: SFTPAttrs) -> None:
        p = quote(path)
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
        if f.writable:  # with what the client wrote, not yet there
            attrs.size = f.size_with(attrs.size or 0)
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
        if f.tail:  # the file's end moves: what is there now, then what was written
            built = await self.inside.content(f)
            try:
                built.seek(offset)
                return built.read(size)
            finally:
                built.close()
        await self.inside.fill(f)
        f.spool.seek(offset)
        return f.spool.read(size)

    async def write(self, file_obj: object, offset: int, data: bytes) -> int:
        f = _file(file_obj)
        if not f.writable:
            raise asyncssh.SFTPPermissionDenied("file not opened for writing")
        return f.write(offset, data)

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
            if f.tail:  # the size counts from the start: all of it here
                built = await self.inside.content(f)
                f.spool.close()
                f.spool, f.whole, f.filled = built, True, True
            f.resize(attrs.size)
        f.set_later(attrs)  # after the write-back, which would change the times

    async def remove(self, path: bytes) -> None:
        await self.inside.sh(f"rm -- {quote(path)} </dev/null")

    async def mkdir(self, path: bytes, attrs: SFTPAttrs) -> None:
        p = quote(path)
        mode = f" && {chmod_line(attrs.permissions, p)}" if attrs.permissions is not None else ""
        await self.inside.sh(f"mkdir -- {p}{mode}")

    async def rmdir(self, path: bytes) -> None:
        await self.inside.sh(f"rmdir -- {quote(path)}")

    async def rename(self, oldpath: bytes, newpath: bytes) -> None:
        new = quote(newpath)
        await self.inside.sh(f"if [ -e {new} ] || [ -L {new} ]; then echo {new}': File exists' "
                             f">&2; exit 1; fi; mv -- {quote(oldpath)} {new}")  # fmt: skip

    async def posix_rename(self, oldpath: bytes, newpath: bytes) -> None:
        old, new = quote(oldpath), quote(newpath)
        # rename(2): over a file or an empty folder, never into a folder (as mv would).
        await self.inside.sh(f"if [ -d {new} ] && [ ! -L {new} ]; then [ -d {old} ] && rmdir -- "
                             f"{new} || exit 1; fi; mv -f -- {old} {new}")  # fmt: skip

    async def readlink(self, path: bytes) -> bytes:
        p = quote(path)
        out = await self.inside.sh(
            f"if [ -L {p} ]; then exec readlink -- {p}; elif [ -e {p} ]; then "
            f"echo {p}': Invalid argument' >&2; else echo {p}': No such file or directory' >&2; "
            "fi; exit 1"
        )
        return out[:-1] if out.endswith(b"\n") else out

    async def symlink(self, oldpath: bytes, newpath: bytes) -> None:
        await self.inside.sh(f"ln -s -- {quote(oldpath)} {quote(newpath)}")

    async def link(self, oldpath: bytes, newpath: bytes) -> None:
        await self.inside.sh(f"ln -- {quote(oldpath)} {quote(newpath)}")

    def statvfs(self, path: bytes) -> asyncssh.SFTPVFSAttrs:
        raise asyncssh.SFTPOpUnsupported("statvfs not supported")

    def fstatvfs(self, file_obj: object) -> asyncssh.SFTPVFSAttrs:
        raise asyncssh.SFTPOpUnsupported("fstatvfs not supported")

    async def fsync(self, file_obj: object) -> None:
        f = _file(file_obj)
        if f.dirty:
            await self.inside.flush(f)


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


async def serve(
    process: asyncssh.SSHServerProcess[bytes],
    run: Runner,
    workdir: str,
    gets_input: bool | None = None,
) -> int:
    """Serve the session's SFTP here until the client ends it; its exit code.
    ``gets_input``: whether commands inside get their input, if known."""
    server = Server(process.channel, Inside(run, workdir, gets_input))
    await run_sftp_server(server, process.stdin, _Exits(process), 3)
    return 0
