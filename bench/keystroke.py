"""Keystroke echo in an interactive session (issue 13): `ssh -tt HOST cat` on a
pseudo-terminal of ours, one character typed, the time until the far side's
terminal echoes it back. The two sessions (through `NAME.vendetta`, and to the
node's own sshd) are open at once and typed into in turn, so drift hits both.

The far side's terminal echoes a character as it arrives (`cat` has not read
it yet: the line is not finished), so what is timed is the path both ways:
the user's ssh, ssh-proxy, the coordinator, the agent and the engine's
terminal for the workspace; the user's ssh and sshd for the node.
"""

from __future__ import annotations

import os
import pty
import select
import subprocess
import time
import tty
from collections.abc import Sequence
from contextlib import ExitStack

from bench.stats import Series

# Between keystrokes, as a fast typist's (and so no two share a packet).
GAP = 0.02
KEYS = b"abcdefghijklmnopqrstuvwxyz"


class _Session:
    """``argv`` (an `ssh -tt ... cat`) on a pseudo-terminal of ours, kept raw so
    that nothing echoes on this side."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.master, slave = pty.openpty()
        tty.setraw(slave)
        self.proc = subprocess.Popen(
            list(argv), stdin=slave, stdout=slave, stderr=slave, start_new_session=True
        )
        os.close(slave)

    def drain(self) -> None:
        while select.select([self.master], [], [], 0)[0]:
            if not os.read(self.master, 4096):
                return

    def echo(self, key: bytes, timeout: float) -> float:
        """Seconds from writing ``key`` to reading it back."""
        self.drain()
        t0 = time.perf_counter()
        os.write(self.master, key)
        seen = b""
        while key not in seen:
            left = t0 + timeout - time.perf_counter()
            if left <= 0 or not select.select([self.master], [], [], left)[0]:
                raise RuntimeError(f"no echo of {key!r} within {timeout} s: {seen[-200:]!r}")
            seen += os.read(self.master, 4096)
        return time.perf_counter() - t0

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


def measure(sides: Sequence[tuple[Series, Sequence[str]]], keys: int) -> None:
    """``keys`` echoes per side into each Series, the sides typed into in turn."""
    with ExitStack() as stack:
        sessions = []
        for series, argv in sides:
            session = _Session(argv)
            stack.callback(session.close)
            session.echo(b"x", 60)  # the session is up (its start is not timed)
            sessions.append((series, session))
        for i in range(keys):
            key = KEYS[i % len(KEYS) : i % len(KEYS) + 1]
            for series, session in sessions:
                series.seconds.append(session.echo(key, 10))
                time.sleep(GAP)
