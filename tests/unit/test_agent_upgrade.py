"""`vendetta-agent ensure` replaces a running agent from another build (an upgrade)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from common import agent_process


@pytest.fixture
async def agent_dir() -> AsyncIterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vd-up-", dir="/tmp"))
    yield path
    await agent_process.stop(path)
    shutil.rmtree(path, ignore_errors=True)


async def test_same_build_is_kept_other_build_is_replaced(
    agent_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = await agent_process.ensure(agent_dir, [])
    assert first.started
    again = await agent_process.ensure(agent_dir, [])
    assert not again.started and again.pid == first.pid  # idempotent

    # This process now claims another build: the running agent is from "before".
    monkeypatch.setattr(agent_process, "build_id", lambda: "9.9.9+upgraded")
    replaced = await agent_process.ensure(agent_dir, [])
    assert replaced.started and replaced.pid != first.pid
    assert replaced.agent_id == first.agent_id  # same node identity, new process
