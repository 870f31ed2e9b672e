"""Stopping a background process (the coordinator, an agent) that is not our child."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from common.process import terminate

# A parent that forks a child (the "detached process"), prints its pid, and never
# reaps it: as init does in its own time, the child stays a zombie once it exits.
PARENT = """
import os, signal, sys, time
pid = os.fork()
if pid == 0:
    time.sleep(60)
    os._exit(0)
print(pid, flush=True)
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
time.sleep(60)
"""


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):  # a stat whose process just went: ESRCH
        return "gone"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
async def test_an_exited_process_that_its_parent_has_not_reaped_is_stopped() -> None:
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PARENT, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert parent.stdout is not None
        child = int(await parent.stdout.readline())
        # The zombie holds nothing: terminate is done once the child exited, well
        # before its own 600 s (taken for alive, it was waited out while its parent lived).
        assert await asyncio.wait_for(terminate(child, timeout=600), 30)
        assert _state(child) == "Z"  # exited; still there, as its parent did not reap it
    finally:
        parent.terminate()
        await asyncio.wait_for(parent.wait(), 10)
