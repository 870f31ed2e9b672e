"""Terminals on the guests' terminal consoles: one at a time per guest, opened cancel-safely.

The console itself and the session on it are in ``terminal``; this is the
provider's side: which consoles are in use, and opening a session so that a
caller cancelled meanwhile leaves no shell running in the guest.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Mapping, Sequence

import libvirt

from common.errors import FailedPreconditionError
from providers.qemu.errors import guest_running
from providers.qemu.terminal import QemuTerminal, hang_up, open_session
from providers.threaded import EngineClient, open_or_abandon

Session = tuple[socket.socket, int, bytes]


class Consoles:
    """The terminal consoles in use by terminals of one provider."""

    def __init__(self, client: EngineClient[libvirt.virConnect]) -> None:
        self._client = client
        self._in_use: set[str] = set()  # names of the domains

    async def open(
        self,
        dom: libvirt.virDomain,
        alias: str,
        workspace: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        rows: int,
        cols: int,
    ) -> QemuTerminal:
        """``argv`` on the terminal console ``alias`` of ``dom`` ('': the guest has none)."""
        if not alias:
            raise missing_console(workspace)
        name = dom.name()
        if name in self._in_use:
            raise busy(workspace)
        self._in_use.add(name)

        def start(_conn: libvirt.virConnect) -> Session:
            with guest_running(dom):
                return open_session(dom, alias, workspace, argv, env, rows, cols)

        async def opening() -> Session:
            try:
                return await self._client.call(f"opening a terminal in {workspace!r}", start)
            except BaseException:
                self._in_use.discard(name)
                raise

        def abandon(opened: Session) -> Awaitable[None]:
            # Cancelled while the guest was starting it: end the session, so no shell
            # is left running with nobody attached.
            opened[0].close()
            self._in_use.discard(name)
            return asyncio.to_thread(hang_up, dom)

        sock, pid, first = await open_or_abandon(opening, abandon)
        return QemuTerminal(
            dom,
            sock,
            pid,
            first,
            client=self._client,
            workspace=workspace,
            release=lambda: self._in_use.discard(name),
        )


def missing_console(workspace: str) -> FailedPreconditionError:
    return FailedPreconditionError(
        f"workspace {workspace!r} was created before QEMU workspaces had terminals: its guest "
        f"has no terminal console. Recreate the workspace for one (`vendetta workspace destroy "
        f"{workspace}`, then `vendetta workspace create {workspace}`), or run commands without "
        f"a terminal: `vendetta workspace connect {workspace} -- CMD ...`"
    )


def busy(workspace: str) -> FailedPreconditionError:
    return FailedPreconditionError(
        f"a terminal is already open in workspace {workspace!r} (a QEMU guest has one terminal "
        "console): close it first, or run commands without a terminal: "
        f"`vendetta workspace connect {workspace} -- CMD ...`"
    )


__all__ = ["Consoles"]
