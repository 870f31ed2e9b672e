"""Commands in a running LXD instance, as the provider's hooks open them: a
command on pipes (``exec`` and ``pipe``), a recorded run (``run``) and an
interactive terminal (``attach``).

The blocking parts live in ``execs`` (pipes, recorded runs) and ``terminal``;
here they are opened off the event loop through the provider's
``EngineClient`` (errors translated by ``errors``), and opened so that a
caller cancelled meanwhile leaves nothing running inside
(``providers.threaded.open_or_abandon``).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from common.errors import NotRunningError
from providers.lxd import execs
from providers.lxd.errors import translate
from providers.lxd.source import Inside
from providers.lxd.terminal import LxdTerminal, open_terminal
from providers.lxd.websocket import THREAD_PREFIX
from providers.threaded import EngineClient, open_or_abandon

# A terminal's TERM unless the caller gives one (LXD sets none; Docker gives xterm).
DEFAULT_TERM = "xterm"


class Sessions:
    """Opens commands in instances of one LXD daemon (``where``, for messages).

    ``not_running(workspace)`` is the provider's error for a workspace found not
    running: what a pipe's output raises when LXD says so after it opened.
    """

    def __init__(
        self,
        engine: EngineClient[Any],
        where: str,
        not_running: Callable[[str], NotRunningError],
    ) -> None:
        self._engine = engine
        self._where = where
        self._not_running = not_running

    async def pipe(
        self,
        instance: str,
        workspace: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None,
        workdir: str,
        inside: Inside = execs.NOWHERE,
    ) -> execs.LxdPipe:
        """argv on pipes, over websocket-client sockets of our own (see ``execs``)."""
        action = f"running {argv[0]!r} in {workspace!r}"

        def output_error(exc: BaseException) -> Exception:
            error = translate(exc, where=self._where, action=action)
            if isinstance(error, NotRunningError):  # stopped while it ran
                return self._not_running(workspace)
            return error

        async def opening() -> execs.LxdPipe:
            ex = await self._engine.call(
                action,
                lambda c: execs.open_exec(c, instance, argv, env or {}, workdir or None, inside),
            )
            return execs.LxdPipe(await self._engine.client(), ex, workspace, output_error)

        return await open_or_abandon(opening, lambda pipe: pipe.close())

    async def run(
        self,
        instance: str,
        workspace: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None,
        workdir: str,
        inside: Inside = execs.NOWHERE,
    ) -> tuple[int, bytes, bytes]:
        """Run argv to completion, its output recorded by LXD (see ``execs.run_recorded``).

        In a daemon thread of its own, not an executor slot: a command may run for
        long. Cancelling stops the wait; the command runs on, as LXD cannot stop it.
        """
        action = f"running {argv[0]!r} in {workspace!r}"
        loop = asyncio.get_running_loop()
        result: asyncio.Future[tuple[int, bytes, bytes]] = loop.create_future()

        def deliver(outcome: tuple[int, bytes, bytes] | BaseException) -> None:
            if result.done():
                return  # cancelled: nobody waits
            if isinstance(outcome, BaseException):
                result.set_exception(outcome)
            else:
                result.set_result(outcome)

        def work() -> None:
            outcome: tuple[int, bytes, bytes] | BaseException
            try:
                outcome = self._engine.call_sync(
                    action,
                    lambda c: execs.run_recorded(
                        c, instance, argv, env or {}, workdir or None, result.done, inside
                    ),
                )
            except Exception as exc:
                outcome = exc
            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(deliver, outcome)

        threading.Thread(target=work, name=f"{THREAD_PREFIX}run-{workspace}", daemon=True).start()
        return await result

    async def terminal(
        self,
        instance: str,
        workspace: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None,
        rows: int,
        cols: int,
        inside: Inside = execs.NOWHERE,
    ) -> LxdTerminal:
        """An interactive exec on a PTY of ``rows`` x ``cols`` (see ``terminal``)."""
        action = f"opening a terminal in {workspace!r}"
        environment = {"TERM": DEFAULT_TERM, **(env or {})}

        def open_(client: Any) -> LxdTerminal:
            operation, data, control = open_terminal(
                client, instance, argv, environment, rows, cols, inside
            )
            return LxdTerminal(client, operation, data, control, workspace)

        # Cancelled while LXD starts it: the terminal is hung up once open, so no
        # shell is left running inside with nobody attached.
        return await open_or_abandon(
            lambda: self._engine.call(action, open_), lambda terminal: terminal.close()
        )
