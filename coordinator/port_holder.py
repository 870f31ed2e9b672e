"""Who holds a TCP port on this machine: for errors that say what to stop."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

_LISTEN = "0A"  # TCP state code in /proc/net/tcp


def _listening_inodes(port: int, proc: Path) -> set[str]:
    inodes: set[str] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == _LISTEN and int(local.rsplit(":", 1)[1], 16) == port:
                inodes.add(inode)
    return inodes


def who_holds(port: int, proc: Path = Path("/proc")) -> str:
    """'pid 123 (nginx)' for the listener on ``port``, or a hint when it is not visible."""
    inodes = _listening_inodes(port, proc)
    if inodes:
        wanted = {f"socket:[{i}]" for i in inodes}
        for entry in proc.iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                for fd in os.scandir(entry / "fd"):
                    with contextlib.suppress(OSError):
                        if os.readlink(fd.path) in wanted:
                            comm = (entry / "comm").read_text().strip()
                            return f"pid {entry.name} ({comm})"
    return "a process this user cannot see (try `sudo ss -ltnp`)"
