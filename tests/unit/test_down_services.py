"""`down` leaves each service as the agent says it ended, not as the relay last heard."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from coordinator.models import (
    Environment,
    EnvironmentState,
    NodeRecord,
    NodeState,
    ServiceEvent,
    ServiceState,
    ServiceStatus,
    WorkspaceRecord,
    WorkspaceState,
)
from coordinator.store import SqliteStore
from coordinator.workspaces import WorkspaceService
from tests.support.fakes import wait_until


class LaggingAgent:
    """Stops the services and the environment; the relay's stream has not delivered the
    services' `stopped` events by the time the stop answers (a busy coordinator reads the
    stop's answer first), so the relay's view is still `healthy`."""

    def __init__(self) -> None:
        self.state = ServiceState.HEALTHY

    async def watch_services(self, workspace: str, provider: str) -> AsyncIterator[ServiceEvent]:
        yield ServiceEvent(workspace, ServiceStatus(name="web", state=ServiceState.HEALTHY))
        await asyncio.Event().wait()  # the rest is still on its way

    async def stop(self, workspace: str, provider: str, timeout: float) -> Environment:
        self.state = ServiceState.STOPPED
        return Environment(workspace=workspace, state=EnvironmentState.STOPPED)

    async def get_services(self, workspace: str, provider: str) -> list[ServiceStatus]:
        return [ServiceStatus(name="web", state=self.state)]


async def test_down_takes_the_services_final_state_from_the_agent(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "state.db")
    agent = LaggingAgent()

    async def client() -> LaggingAgent:
        return agent

    conn = SimpleNamespace(name="n1", state=NodeState.READY, client=client)
    nodes = SimpleNamespace(get=lambda _name: conn, all=lambda: [conn])
    (tmp_path / "home").mkdir()
    svc = WorkspaceService(store, cast(Any, nodes), home=tmp_path / "home")
    try:
        await store.add_node(NodeRecord(name="n1", address="h", transport="ssh"))
        ws = WorkspaceRecord(
            name="w1", node="n1", provider="docker", image="i", observed=WorkspaceState.RUNNING
        )
        await store.add_workspace(ws)
        svc.relays.expect("w1", ["web"])
        svc.relays.start(ws, cast(Any, agent))
        await wait_until(
            lambda: [s.state for s in svc.service_statuses("w1")] == [ServiceState.HEALTHY],
            "the relay's first event: web is healthy",
        )

        done = await svc.down("w1")
        assert done.observed == WorkspaceState.STOPPED
        assert [s.state for s in svc.service_statuses("w1")] == [ServiceState.STOPPED]
        assert not svc.relays.alive("w1")
    finally:
        svc.relays.close()
        await store.close()
