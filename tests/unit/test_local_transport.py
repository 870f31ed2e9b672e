"""The local node's transport notices its agent's process ending."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from coordinator.transports import LocalTransport


async def test_the_agent_process_ending_closes_the_connection(tmp_path: Path) -> None:
    """Not only after the node's grace (heartbeats): the next connect starts a new agent."""
    agent = await asyncio.create_subprocess_exec(sys.executable, "-c", "input()", stdin=-1)
    transport = LocalTransport(tmp_path / "agent")
    transport._pid = agent.pid  # as connect() sets it from the agent it found or started
    closed = asyncio.create_task(transport.wait_closed())
    try:
        await asyncio.sleep(0.75)
        assert not closed.done()  # the agent runs: the connection stays
        agent.kill()
        await asyncio.wait_for(closed, 30)  # without the look at the process: never
    finally:
        closed.cancel()
        if agent.returncode is None:
            agent.kill()
            await agent.wait()


async def test_close_ends_the_wait_without_an_agent(tmp_path: Path) -> None:
    transport = LocalTransport(tmp_path / "agent")
    closed = asyncio.create_task(transport.wait_closed())
    await asyncio.sleep(0.75)
    assert not closed.done()
    await transport.close()
    await asyncio.wait_for(closed, 30)
