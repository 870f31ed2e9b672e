"""The reconciler, through the coordinator's wire, over in-process agents with fake providers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from typing import Any

import grpc
import grpc.aio
import pytest

from common.errors import EngineUnavailableError
from coordinator import reconciler
from coordinator.models import Desired, WorkspaceRecord, WorkspaceState
from coordinator.store import SqliteStore
from providers.base import EnvironmentSpec, EnvState
from tests.support.fakes import Cluster, running_cluster, wait_until
from vendetta.v1 import coordinator_pb2 as pb

TICK = 0.05


@pytest.fixture
async def ticking() -> AsyncIterator[Cluster]:
    """A cluster whose reconciler ticks every TICK seconds (instead of every 30 s)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reconciler, "RECONCILE_INTERVAL", TICK)
        async with running_cluster() as c:
            yield c


async def create(cluster: Cluster, name: str, node: str = "node1") -> pb.Workspace:
    return await cluster.stub.CreateWorkspace(pb.CreateWorkspaceRequest(name=name, node=node))


async def up(cluster: Cluster, name: str) -> pb.Workspace:
    return await cluster.stub.UpWorkspace(pb.WorkspaceRequest(name=name))


async def get(cluster: Cluster, name: str) -> pb.Workspace:
    return await cluster.stub.GetWorkspace(pb.GetWorkspaceRequest(name=name))


async def names(cluster: Cluster) -> list[str]:
    resp = await cluster.stub.ListWorkspaces(pb.ListWorkspacesRequest())
    return [w.name for w in resp.workspaces]


async def disconnect(cluster: Cluster, node: str) -> None:
    transport = cluster.transport(node)
    transport.unreachable = True
    transport.drop()

    async def away() -> bool:
        resp = await cluster.stub.ListNodes(pb.ListNodesRequest())
        return {n.name: n.state for n in resp.nodes}[node] == pb.NODE_STATE_DISCONNECTED

    await wait_until(away, f"{node} to be DISCONNECTED")


def left_behind(name: str, node: str, observed: WorkspaceState) -> WorkspaceRecord:
    """A record as a coordinator that died in the middle of a command left it."""
    return WorkspaceRecord(
        name=name, node=node, provider="docker", image="ubuntu:22.04", observed=observed
    )


async def test_one_failing_workspace_does_not_stop_the_others(
    fast_reconnect: None, cluster: Cluster
) -> None:
    fake = cluster.provider("node1")
    # "a-broken" comes first in the node's list: its failure must not end the pass.
    for name in ("a-broken", "b-fine", "c-fine"):
        await create(cluster, name)
        await up(cluster, name)
    await disconnect(cluster, "node1")
    for name in ("a-broken", "b-fine", "c-fine"):
        fake.set_state(name, EnvState.STOPPED)
    fake.broken["a-broken"] = EngineUnavailableError("the engine lost a-broken's disk")

    cluster.transport("node1").unreachable = False
    await wait_until(
        lambda: all(fake.state_of(n) == EnvState.RUNNING for n in ("b-fine", "c-fine")),
        "b-fine and c-fine restarted on reconnect",
    )

    async def recorded() -> bool:
        return "the engine lost a-broken's disk" in (await get(cluster, "a-broken")).detail

    await wait_until(recorded, "a-broken's error recorded on it")
    assert fake.state_of("a-broken") == EnvState.STOPPED
    broken = await get(cluster, "a-broken")
    assert broken.desired == pb.DESIRED_STATE_RUNNING
    assert "reconciler" in broken.detail
    for name in ("b-fine", "c-fine"):
        assert (await get(cluster, name)).state == pb.WORKSPACE_STATE_RUNNING

    # Mended: the next pass restarts it and the error goes from its record.
    del fake.broken["a-broken"]
    await cluster.coordinator.reconciler.tick()
    assert fake.state_of("a-broken") == EnvState.RUNNING
    mended = await get(cluster, "a-broken")
    assert (mended.state, mended.detail) == (pb.WORKSPACE_STATE_RUNNING, "")


async def test_a_recorded_failure_goes_once_a_pass_succeeds(cluster: Cluster) -> None:
    fake = cluster.provider("node1")
    await create(cluster, "ws1")  # stays stopped: nothing for the reconciler to start
    fake.broken["ws1"] = EngineUnavailableError("the engine hiccuped")
    await cluster.coordinator.reconciler.tick()
    ws = await get(cluster, "ws1")
    assert "the engine hiccuped" in ws.detail
    assert ws.state == pb.WORKSPACE_STATE_STOPPED

    del fake.broken["ws1"]
    await cluster.coordinator.reconciler.tick()
    ws = await get(cluster, "ws1")
    assert (ws.state, ws.detail) == (pb.WORKSPACE_STATE_STOPPED, "")
    assert ("start", "ws1") not in fake.calls


async def test_tick_restarts_a_stopped_workspace_without_a_reconnect(ticking: Cluster) -> None:
    fake = ticking.provider("node1")
    transport = ticking.transport("node1")
    await create(ticking, "ws1")
    await up(ticking, "ws1")
    connects = transport.connects

    fake.set_state("ws1", EnvState.STOPPED)  # it crashed; the node stays connected

    await wait_until(lambda: fake.state_of("ws1") == EnvState.RUNNING, "ws1 restarted by a tick")

    async def running() -> bool:
        return (await get(ticking, "ws1")).state == pb.WORKSPACE_STATE_RUNNING

    await wait_until(running, "ws1 RUNNING")
    assert transport.connects == connects, "the restart must come from the tick, not a reconnect"
    assert fake.calls.count(("start", "ws1")) == 2  # up, then the reconciler


async def test_tick_leaves_a_workspace_that_should_stay_stopped(ticking: Cluster) -> None:
    fake = ticking.provider("node1")
    await create(ticking, "keep")  # desired: stopped
    await create(ticking, "run")
    await up(ticking, "run")
    fake.set_state("run", EnvState.STOPPED)
    await wait_until(lambda: fake.state_of("run") == EnvState.RUNNING, "run restarted")
    assert ("start", "keep") not in fake.calls
    assert (await get(ticking, "keep")).state == pb.WORKSPACE_STATE_STOPPED


async def test_tick_stops_a_running_workspace_that_should_be_stopped(ticking: Cluster) -> None:
    """A `down` whose stop failed leaves the environment running: a later pass stops it."""
    fake = ticking.provider("node1")
    await create(ticking, "halt")
    await up(ticking, "halt")
    fake.broken["halt"] = EngineUnavailableError("the engine is busy")
    with pytest.raises(grpc.aio.AioRpcError):
        await ticking.stub.DownWorkspace(pb.WorkspaceRequest(name="halt"))
    ws = await get(ticking, "halt")
    assert ws.desired == pb.DESIRED_STATE_STOPPED and ws.state == pb.WORKSPACE_STATE_ERROR
    assert fake.state_of("halt") == EnvState.RUNNING
    del fake.broken["halt"]  # the engine answers again

    async def stopped() -> bool:
        return (await get(ticking, "halt")).state == pb.WORKSPACE_STATE_STOPPED

    await wait_until(stopped, "halt STOPPED by a tick")
    assert fake.state_of("halt") == EnvState.STOPPED
    assert ("start", "halt") not in fake.calls[fake.calls.index(("stop", "halt")) :]


async def test_creating_and_destroying_left_by_a_crash_are_finished_after_a_restart(
    cluster: Cluster,
) -> None:
    fake = cluster.provider("node1")
    await create(cluster, "doomed")
    await cluster.stop_coordinator()

    # What a coordinator killed mid-command leaves: its record says `creating` or
    # `destroying`; the agent did (or did not) get to do the work.
    await fake.create(EnvironmentSpec(workspace="made", image="ubuntu:22.04"))
    store = SqliteStore(cluster.home / "state.db")
    try:
        await store.add_workspace(left_behind("made", "node1", WorkspaceState.CREATING))
        await store.add_workspace(left_behind("never", "node1", WorkspaceState.CREATING))
        doomed = await store.get_workspace("doomed")
        assert doomed is not None
        doomed.observed = WorkspaceState.DESTROYING
        await store.update_workspace(doomed)
        await store.set_port("doomed", "web", 18080)
    finally:
        await store.close()

    await cluster.start_coordinator()

    async def settled() -> bool:
        return await names(cluster) == ["made"]

    await wait_until(settled, "`never` rolled back and `doomed` destroyed")
    # `creating` whose environment exists: finished.
    await wait_until(lambda: _state_is(cluster, "made", pb.WORKSPACE_STATE_STOPPED), "made STOPPED")
    made = await get(cluster, "made")
    assert made.environment_id == fake.environments["made"].id
    assert made.desired == pb.DESIRED_STATE_STOPPED
    assert fake.state_of("made") == EnvState.CREATED
    # `destroying`: the environment is gone too, and so are its remembered ports.
    assert fake.state_of("doomed") == EnvState.ABSENT
    assert await cluster.coordinator.store.get_ports("doomed") == {}
    # `creating` whose environment never came: nothing left, and the name is free again.
    assert fake.state_of("never") == EnvState.ABSENT
    assert (await create(cluster, "never")).state == pb.WORKSPACE_STATE_STOPPED


async def test_disconnected_node_is_not_touched(fast_reconnect: None, ticking: Cluster) -> None:
    fake = ticking.provider("node1")
    local = ticking.provider("local")
    await create(ticking, "remote-run")
    await up(ticking, "remote-run")
    await create(ticking, "remote-doomed")
    await create(ticking, "local-run", node="local")
    await up(ticking, "local-run")
    await disconnect(ticking, "node1")

    # Half-done records on the disconnected node must wait for it, whatever the ticks.
    store = ticking.coordinator.store
    doomed = await store.get_workspace("remote-doomed")
    assert doomed is not None
    doomed.observed = WorkspaceState.DESTROYING
    await store.update_workspace(doomed)
    await store.add_workspace(left_behind("remote-half", "node1", WorkspaceState.CREATING))
    fake.set_state("remote-run", EnvState.STOPPED)
    calls = list(fake.calls)

    # The ticks go on meanwhile: a local workspace that stopped is restarted...
    local.set_state("local-run", EnvState.STOPPED)
    await wait_until(lambda: local.state_of("local-run") == EnvState.RUNNING, "a tick on local")
    starts = local.calls.count(("start", "local-run"))
    local.set_state("local-run", EnvState.STOPPED)
    await wait_until(lambda: local.calls.count(("start", "local-run")) > starts, "another tick")

    # ... while nothing of node1 was asked, restarted, destroyed or forgotten.
    assert fake.calls == calls
    assert fake.state_of("remote-run") == EnvState.STOPPED
    assert fake.state_of("remote-doomed") == EnvState.CREATED
    assert await names(ticking) == ["local-run", "remote-doomed", "remote-half", "remote-run"]
    assert (await get(ticking, "remote-run")).state == pb.WORKSPACE_STATE_UNKNOWN
    record = await store.get_workspace("remote-run")
    assert record is not None
    assert (record.desired, record.observed) == (Desired.RUNNING, WorkspaceState.RUNNING)
    err = await _rpc_error(up(ticking, "remote-run"))
    assert err.code() == grpc.StatusCode.UNAVAILABLE

    # When node1 returns, the reconciler finishes what was pending there.
    ticking.transport("node1").unreachable = False
    await wait_until(lambda: fake.state_of("remote-run") == EnvState.RUNNING, "remote-run back")

    async def settled() -> bool:
        return await names(ticking) == ["local-run", "remote-run"]

    await wait_until(settled, "remote-doomed destroyed and remote-half rolled back")
    assert fake.state_of("remote-doomed") == EnvState.ABSENT


async def _state_is(cluster: Cluster, name: str, state: int) -> bool:
    return (await get(cluster, name)).state == state


async def _rpc_error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value
