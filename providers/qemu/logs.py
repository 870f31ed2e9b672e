"""A guest's output as log records, read from the host files libvirt writes. Blocking helpers.

Three streams, each a host file: ``console`` (the serial console: kernel and
init messages), and ``stdout``/``stderr`` (virtio-serial ports the guest's
PID 1 and the workspace command write to). Lines carry the time they were
read (files hold no timestamps); a stopped guest's logs stay readable.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from providers.base import LogRecord

MAX_LINE = 64 * 1024


@dataclass
class FileCursor:
    """Reads whole lines appended to one file since the last read."""

    path: Path
    stream: str
    offset: int = 0
    partial: bytes = b""
    _ident: tuple[int, int] | None = field(default=None, repr=False)

    def read(self) -> list[LogRecord]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return []
        ident = (st.st_dev, st.st_ino)
        if self._ident is not None and (ident != self._ident or st.st_size < self.offset):
            self.offset, self.partial = 0, b""  # rotated or truncated: start over
        self._ident = ident
        if st.st_size == self.offset:
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        if len(self.partial) > MAX_LINE:
            lines.append(self.partial)
            self.partial = b""
        now = time.time_ns()
        return [
            LogRecord(
                time_unix_nano=now,
                stream=self.stream,
                text=line.rstrip(b"\r").decode("utf-8", "replace"),
            )
            for line in lines
        ]


def cursors(console: Path, stdout: Path, stderr: Path) -> list[FileCursor]:
    return [
        FileCursor(console, "console"),
        FileCursor(stdout, "stdout"),
        FileCursor(stderr, "stderr"),
    ]


def read_all(files: list[FileCursor], tail: int | None) -> list[LogRecord]:
    records = [r for c in files for r in c.read()]
    if tail is not None:
        records = records[-tail:] if tail else []
    return records
