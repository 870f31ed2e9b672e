"""Forwarded service ports as the coordinator reports them, across service events."""

from __future__ import annotations

import errno
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, cast

from coordinator.models import ServiceEvent, ServiceState, ServiceStatus, WorkspaceRecord
from coordinator.ports import PortManager
from coordinator.relays import ServiceRelays

TAKEN = 8080


@dataclass
class FakeForward:
    port: int

    def close(self) -> None:
        pass


class FakeTransport:
    """Port 8080 is taken here; port 0 gets the next free number."""

    def __init__(self) -> None:
        self.next_free = 40000

    async def forward(self, port: int, host: str, remote: int) -> FakeForward:
        if port == TAKEN:
            raise OSError(errno.EADDRINUSE, "in use")
        if port == 0:
            self.next_free += 1
            port = self.next_free
        return FakeForward(port)


class FakeStore:
    def __init__(self) -> None:
        self.ports: dict[str, dict[str, int]] = {}

    async def get_ports(self, ws: str) -> dict[str, int]:
        return dict(self.ports.get(ws, {}))

    async def set_port(self, ws: str, service: str, port: int) -> None:
        self.ports.setdefault(ws, {})[service] = port


def running(detail: str = "") -> ServiceStatus:
    return ServiceStatus(
        name="web",
        state=ServiceState.HEALTHY,
        port=TAKEN,
        node_endpoint="127.0.0.1:5000",
        detail=detail,
    )


async def test_a_shift_note_outlives_the_next_service_event() -> None:
    """Seen in CI: the note vanished when the agent's next event replaced the status."""
    nodes = SimpleNamespace(get=lambda _node: SimpleNamespace(transport=FakeTransport()))
    ports = PortManager(cast(Any, FakeStore()), cast(Any, nodes))
    published: list[str] = []
    relays = ServiceRelays(ports, lambda _ws, msg, _st: published.append(msg))
    ws = WorkspaceRecord(name="site", node="n1", provider="docker", image="x")
    relays.update("site", [running()])

    await relays.forward(ws, {})
    assert published == ["web: port 8080 is taken on this machine, using localhost:40001 instead"]
    relays.record(ws, ServiceEvent(workspace="site", service=running("still healthy")))

    [web] = relays.statuses("site")
    assert web.local_address == "localhost:40001"
    assert web.local_note == "port 8080 is taken on this machine"
    relays.detach("site")  # down: the forward and its note go
    [web] = relays.statuses("site")
    assert web.local_address == "" and web.local_note == ""
