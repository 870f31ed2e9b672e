"""Background processes (agent, coordinator): detached start, readiness wait, stop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from common.errors import FailedPreconditionError, UnavailableError
from common.paths import private_file

T = TypeVar("T")


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _spawn(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with private_file(log_path) as log:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlive the shell or SSH session that started it
            close_fds=True,
        )


async def start_detached(
    what: str,
    argv: list[str],
    log_path: Path,
    ready: Callable[[], Awaitable[T | None]],
    timeout: float = 30.0,
) -> tuple[T, int]:
    """Start ``argv`` in its own session and wait until ``ready()`` returns something."""
    proc = await asyncio.to_thread(_spawn, argv, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FailedPreconditionError(
                f"the {what} exited at start (code {proc.returncode}); its log {log_path} "
                f"ends with:\n{await asyncio.to_thread(log_tail, log_path)}"
            )
        result = await ready()
        if result is not None:
            return result, proc.pid
        await asyncio.sleep(0.1)
    raise UnavailableError(
        f"the {what} did not answer within {timeout:.0f}s; see {log_path}:\n"
        f"{await asyncio.to_thread(log_tail, log_path)}"
    )


def read_pid(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return 0


async def terminate(pid: int, timeout: float = 15.0) -> bool:
    """SIGTERM ``pid``, wait for it to exit, SIGKILL after ``timeout``; False if absent."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gone(pid):
            return True
        await asyncio.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return True


def gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (reaped here if it is our child)."""
    # A process we started (the coordinator starts the local agent) stays a
    # zombie, still signalable, until reaped: reap it if it is ours.
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # Exited, but another's child: a zombie until its parent (init, for a detached
    # process) reaps it in its own time, which took 1-2 s on the CI machine.
    return _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # gone meanwhile, or no /proc: the next look says
        return False
    return stat.rpartition(")")[2].split()[:1] == ["Z"]
