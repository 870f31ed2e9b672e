"""What a running workspace's services are doing, as seen from the coordinator.

Their last known state, kept fresh by a relay of the agent's service events
while the workspace runs, and their ports forwarded to the user's machine.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from common.errors import VendettaError
from coordinator.agent_client import AgentClient
from coordinator.models import ServiceEvent, ServiceStatus, WorkspaceRecord
from coordinator.ports import PortManager

Publish = Callable[[WorkspaceRecord, str, ServiceStatus | None], None]


class ServiceRelays:
    def __init__(self, ports: PortManager, publish: Publish) -> None:
        self.ports = ports
        self._publish = publish
        self._statuses: dict[str, dict[str, ServiceStatus]] = {}
        self._relays: dict[str, asyncio.Task[None]] = {}

    def statuses(self, name: str) -> list[ServiceStatus]:
        """The workspace's services, each with where it is on this machine."""
        statuses = list(self._statuses.get(name, {}).values())
        self.ports.annotate(name, statuses)
        return statuses

    def expect(self, name: str, services: list[str]) -> None:
        """A fresh start: these services, nothing known of them yet."""
        self._statuses[name] = {s: ServiceStatus(name=s) for s in services}

    def update(self, name: str, statuses: list[ServiceStatus]) -> None:
        for st in statuses:
            self._statuses.setdefault(name, {})[st.name] = st

    def record(self, ws: WorkspaceRecord, ev: ServiceEvent) -> None:
        self.update(ws.name, [ev.service])
        if ev.message:  # none: the agent's state at the start of a watch, not news
            self._publish(ws, ev.message, ev.service)

    def start(self, ws: WorkspaceRecord, client: AgentClient) -> None:
        """Keep service state and events flowing while the workspace runs."""
        self.stop(ws.name)

        async def relay() -> None:
            with contextlib.suppress(VendettaError):
                async for ev in client.watch_services(ws.name, ws.provider):
                    self.record(ws, ev)

        self._relays[ws.name] = asyncio.create_task(relay(), name=f"relay-{ws.name}")

    async def settle(self, ws: WorkspaceRecord, client: AgentClient) -> None:
        """Take the agent's word for where each service stands, before the relay is
        detached: after a stop its last events may still be on their way (the stop's
        answer comes on another call), and detaching drops them, which left services
        `healthy` in a stopped workspace."""
        if not self._statuses.get(ws.name):
            return
        with contextlib.suppress(VendettaError):
            self.update(ws.name, await client.get_services(ws.name, ws.provider))

    def alive(self, name: str) -> bool:
        task = self._relays.get(name)
        return task is not None and not task.done()

    def stop(self, name: str) -> None:
        task = self._relays.pop(name, None)
        if task is not None:
            task.cancel()

    async def forward(self, ws: WorkspaceRecord, pinned: dict[str, int]) -> None:
        """Forward every published service port here; announce any shifted port."""
        for note in await self.ports.ensure(ws.name, ws.node, self.statuses(ws.name), pinned):
            self._publish(ws, note, None)

    def detach(self, name: str) -> None:
        """No more relay, no more forwards (down, destroy, a dropped connection)."""
        self.stop(name)
        self.ports.close_workspace(name)

    def forget(self, name: str) -> None:
        self.detach(name)
        self._statuses.pop(name, None)

    def close(self) -> None:
        for name in list(self._relays):
            self.stop(name)
        self.ports.close_all()
