"""One spare command shell per running Docker workspace (fifo_pipes.Spare): once
any command on pipes in a container has ended, the next one's shell is started
there in the background, on its own FIFOs, and waits for its command. Docker's
exec start (runc: 50 ms of each scp's, rsync's or git's start on the bench's
node) then comes between sessions, not in one. Not while the command runs:
started beside an scp, runc's work took CPU from the copy on a 2-core node and
the copy was slower. The first command of a workspace still starts its own.

A spare is an idle `sh` inside until it is used (the container's own user, its
FIFOs reachable by the agent alone); it goes with the workspace's stop, destroy
or the agent, and one whose shell has ended is not handed out.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from providers.docker import fifo_pipes
from providers.docker.fifo_pipes import FifoTerminal, Spare
from providers.threaded import EngineClient

log = logging.getLogger("vendetta.agent.docker")


class Spares:
    def __init__(self, engine: EngineClient[Any]) -> None:
        self._engine = engine
        self._spares: dict[str, tuple[str, Spare]] = {}  # workspace -> (container, spare)
        self._opening: dict[str, asyncio.Task[None]] = {}
        self._closed = False  # the provider is closing: no more spares

    async def take(
        self,
        workspace: str,
        container_id: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None,
    ) -> FifoTerminal | None:
        """The workspace's spare become argv, where it has one that can."""
        held = self._spares.pop(workspace, None)
        if held is None:
            return None
        container, spare = held
        terminal = None
        with contextlib.suppress(Exception):  # any doubt: a command of its own
            if container == container_id:
                terminal = await spare.take(argv, env)
        if terminal is None:
            await spare.terminal.close()
        return terminal

    def refill(self, workspace: str, container_id: str, folder: Path, action: str) -> None:
        """Start the workspace's next spare in the background, unless one is there or
        on its way (called as one of its commands closes: FifoTerminal.on_closed)."""
        if self._closed or workspace in self._spares or workspace in self._opening:
            return
        task = asyncio.create_task(self._open(workspace, container_id, folder, action))
        self._opening[workspace] = task
        task.add_done_callback(functools.partial(self._opened, workspace))

    def _opened(self, workspace: str, task: asyncio.Task[None]) -> None:
        if self._opening.get(workspace) is task:  # not a later one, after a drop
            del self._opening[workspace]

    async def _open(self, workspace: str, container_id: str, folder: Path, action: str) -> None:
        try:
            spare = await fifo_pipes.open_spare(self._engine, container_id, folder, action=action)
        except Exception as exc:  # a spare only ever saves time: the next command starts its own
            log.debug("no spare shell in %s: %s", workspace, exc)
            return
        if spare is not None:
            self._spares[workspace] = (container_id, spare)

    async def settle(self) -> None:
        """Until the spares being started are there (or failed)."""
        await asyncio.gather(*self._opening.values(), return_exceptions=True)

    async def drop(self, workspace: str) -> None:
        """The workspace's spare, and one being started, gone (it stops or goes)."""
        task = self._opening.pop(workspace, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        held = self._spares.pop(workspace, None)
        if held is not None:
            await held[1].terminal.close()

    async def close(self) -> None:
        self._closed = True
        for workspace in [*self._opening, *self._spares]:
            await self.drop(workspace)
