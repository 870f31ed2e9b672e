"""Pipe sizes: Linux's default pipe holds 64 KiB; the most a non-root user may set
is /proc/sys/fs/pipe-max-size (1 MiB by default). A larger pipe between two
processes that copy bulk data means fewer, larger writes and reads, each a
wake-up of the other (cli/ssh_stdio.py, providers/docker/fifo_pipes.py)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat

PIPE_SIZE = 1024 * 1024


def widen(fd: int, size: int = PIPE_SIZE) -> None:
    """Make the pipe or FIFO on ``fd`` hold ``size`` bytes where allowed; anything
    else, or a size above the limit, is left as it is."""
    setpipe = getattr(fcntl, "F_SETPIPE_SZ", None)
    if setpipe is None or not stat.S_ISFIFO(os.fstat(fd).st_mode):
        return
    with contextlib.suppress(OSError):  # above the limit: the default stays
        fcntl.fcntl(fd, setpipe, size)
