"""The provider's side of commands with stdin in guests: one multiplexer per guest.

A guest's connection (mux.py) is made on its first such command and kept for
the next ones; one that ended (the guest stopped or restarted) is made again.
Its guest end is started by the guest agent, as root: each command's argv
already carries the workspace's user and folder (domain.guest_argv).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence

import libvirt

from providers.qemu import agent
from providers.qemu.channel import open_channel
from providers.qemu.domain import MUX_CHANNEL
from providers.qemu.errors import guest_running
from providers.qemu.mux import GuestMux, MuxStream, NoPython, Stalled
from providers.threaded import EngineClient

# asyncio's read buffer on the connection: a few of the guest's chunks.
LIMIT = 1 << 18


class Pipes:
    """The multiplexer connections of one provider's guests, by domain name."""

    def __init__(self, client: EngineClient[libvirt.virConnect], uri: str) -> None:
        self._client, self._uri = client, uri
        self._muxes: dict[str, GuestMux] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # Guests found without python3, by name: the run (domain id) they were found in.
        self._no_python: dict[str, int] = {}

    async def open(
        self, dom: libvirt.virDomain, workspace: str, argv: Sequence[str], env: Mapping[str, str]
    ) -> MuxStream:
        env = {**agent.BASE_ENV, **env}
        mux = await self._mux(dom, workspace)
        try:
            return await mux.open(argv, env)
        except Stalled:
            # Its guest end was killed inside (a `pkill python3` as root): start anew.
            return await (await self._mux(dom, workspace)).open(argv, env)

    async def _mux(self, dom: libvirt.virDomain, workspace: str) -> GuestMux:
        name, run = dom.name(), dom.ID()
        async with self._locks.setdefault(name, asyncio.Lock()):
            if self._no_python.get(name) == run:  # asked once per run of the guest
                raise NoPython(f"the guest of workspace {workspace!r} has no python3")
            mux = self._muxes.get(name)
            if mux is None or mux.closed is not None:
                action = f"starting the stream relay in {workspace!r}"
                sock = await asyncio.to_thread(
                    lambda: open_channel(self._uri, name, workspace, channel=MUX_CHANNEL)
                )
                reader, writer = await asyncio.open_unix_connection(sock=sock, limit=LIMIT)
                try:
                    mux = await GuestMux.start_on(
                        reader, writer, workspace, self._starter(dom, action)
                    )
                except NoPython:
                    self._no_python[name] = run
                    raise
                self._muxes[name] = mux
            return mux

    def _starter(
        self, dom: libvirt.virDomain, action: str
    ) -> Callable[[Sequence[str]], Awaitable[Callable[[], Awaitable[tuple[int, bytes] | None]]]]:
        async def start(argv: Sequence[str]) -> Callable[[], Awaitable[tuple[int, bytes] | None]]:
            def run(_conn: libvirt.virConnect) -> int:
                with guest_running(dom):
                    return agent.exec_start(dom, argv, {}, capture=True)

            pid = await self._client.call(action, run)

            async def ended() -> tuple[int, bytes] | None:
                def poll(_conn: libvirt.virConnect) -> tuple[bool, int, bytes, bytes]:
                    with guest_running(dom):
                        return agent.exec_status(dom, pid)

                exited, code, out, err = await self._client.call(action, poll)
                return (code, err + out) if exited else None

            return ended

        return start

    def held(self) -> set[str]:
        """The guests with something kept for them (a connection, a lock, a mark)."""
        return {*self._muxes, *self._locks, *self._no_python}

    async def forget(self, name: str) -> None:
        """A destroyed guest: its connection (closed with it), lock and python3 mark go."""
        mux = self._muxes.pop(name, None)
        self._locks.pop(name, None)
        self._no_python.pop(name, None)
        if mux is not None:
            await mux.aclose()

    async def close(self) -> None:
        for mux in list(self._muxes.values()):
            await mux.aclose()
        self._muxes.clear()
