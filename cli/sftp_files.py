"""The builtin SFTP server's open files (cli/sftp_builtin.py): each spooled on
this machine with the byte ranges the client wrote, so that at close only those
go over the file's content inside as it is then (as sftp-server's writes would:
what another handle or the workspace changed elsewhere in the file stays)."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from typing import IO

import asyncssh
from asyncssh import SFTPAttrs

COPY = 256 * 1024
# Set by fsetstat on an open file: applied after its write-back (which changes the times).
_LATER = ("permissions", "uid", "gid", "atime", "mtime")


@contextlib.contextmanager
def local() -> Iterator[None]:
    """The spool failing (a full disk here) is this machine's failure, not the workspace's."""
    try:
        yield
    except OSError as exc:
        raise asyncssh.SFTPFailure(
            f"cannot keep the file's data in {tempfile.gettempdir()} on this machine: "
            f"{exc.strerror or exc}"
        ) from exc


class Spool:
    """A temporary file here whose failures say so (see ``local``)."""

    def __init__(self) -> None:
        with local():
            self.raw: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 (closed by close)

    def read(self, size: int = -1, /) -> bytes:
        with local():
            return self.raw.read(size)

    def write(self, data: bytes, /) -> int:
        with local():
            return self.raw.write(data)

    def seek(self, offset: int, whence: int = 0, /) -> int:
        with local():
            return self.raw.seek(offset, whence)

    def truncate(self, size: int) -> None:
        with local():
            self.raw.truncate(size)

    def end(self) -> int:
        return self.seek(0, 2)

    def copy(self, into: Spool, start: int, length: int, at: int) -> None:
        """``length`` bytes (fewer at the end) from ``start`` here to ``at`` in ``into``."""
        self.seek(start)
        into.seek(at)
        while length > 0 and (data := self.read(min(COPY, length))):
            into.write(data)
            length -= len(data)

    def close(self) -> None:
        self.raw.close()


def merged(ranges: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """``ranges`` (sorted, apart) with [start, end) added."""
    if start >= end:
        return ranges
    result = []
    for a, b in ranges:
        if b < start or a > end:
            result.append((a, b))
        else:
            start, end = min(a, start), max(b, end)
    result.append((start, end))
    return sorted(result)


class File:
    """An open file. Read-only: its content, fetched at open. Writable: what the
    client wrote (``written``: where), over the file's content at close (a
    write-only open writing all of it, as scp does, fetches nothing); ``whole``
    once the spool is all the file is to hold (opened truncated, or truncated to
    a size all written), then the spool is written back as it is; ``filled``
    once it also holds the rest of the file's bytes, fetched for a read. An
    append-only one holds what goes at the file's end (``tail``)."""

    def __init__(self, path: bytes, writable: bool, append: bool, whole: bool) -> None:
        self.path = path
        self.writable = writable
        self.append = append
        self.whole = whole
        self.filled = whole or not writable
        self.dirty = False
        self.changes = 0  # writes and sizes set, counted (see Inside.flush)
        self.written: list[tuple[int, int]] = []
        self.cut: int | None = None  # the least size set: the file's own bytes past it are gone
        self.size: int | None = None  # the size set, grown by writes past it
        self.later: SFTPAttrs | None = None
        self.spool = Spool()

    @property
    def tail(self) -> bool:
        return self.append and not self.whole

    def seek(self, offset: int, whence: int = 0) -> int:  # asyncssh's ranges request
        return self.spool.raw.seek(offset, whence)

    def write(self, offset: int, data: bytes) -> int:
        self.spool.seek(0 if self.append else offset, 2 if self.append else 0)
        done = self.spool.write(data)  # first: a failed write is not recorded
        if not self.append:
            self.written = merged(self.written, offset, offset + len(data))
            if self.size is not None:
                self.size = max(self.size, offset + len(data))
        self.dirty = True
        self.changes += 1
        return done

    def resize(self, size: int) -> None:
        """A size set: the spool and what was written end there."""
        self.spool.truncate(size)
        self.dirty = True
        self.changes += 1
        if self.whole:
            return
        self.written = [(a, min(b, size)) for a, b in self.written if a < size]
        self.cut = size if self.cut is None else min(self.cut, size)
        self.size = size
        if size == 0 or self.written[:1] == [(0, size)]:
            self.whole = self.filled = True

    def overlay(self, base: Spool) -> None:
        """``base``, the file's content inside, becomes what it is to hold."""
        if self.tail:
            self.spool.copy(base, 0, self.spool.end(), base.end())
            return
        if self.cut is not None:
            base.truncate(self.cut)
        for a, b in self.written:
            self.spool.copy(base, a, b - a, a)
        if self.size is not None:
            base.truncate(self.size)

    def sent(self) -> None:
        """The spool's content is the file's now: nothing is written but what comes next."""
        self.dirty = False
        self.written, self.cut, self.size = [], None, None
        if self.append:
            self.spool.truncate(0)
            self.whole = self.filled = False
        else:
            self.whole, self.filled = False, True

    def size_with(self, inside: int) -> int:
        """Its size, given the size of the file inside."""
        if self.whole:
            return self.spool.end()
        if self.tail:
            return inside + self.spool.end()
        if self.size is not None:
            return self.size
        return max([inside] + [b for _, b in self.written[-1:]])

    def set_later(self, attrs: SFTPAttrs) -> None:
        later = self.later = self.later or SFTPAttrs()
        for name in _LATER:
            if (value := getattr(attrs, name)) is not None:
                setattr(later, name, value)
