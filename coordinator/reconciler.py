"""The reconciler: drives each workspace's observed state toward its desired state.

It runs over a node's workspaces when the node (re)connects and again on a
periodic tick, one workspace at a time and each on its own: a workspace whose
reconcile fails is logged and its error recorded on it, and the others go on.
It also finishes what a coordinator crash left half done: a `destroying`
workspace is destroyed; a `creating` one is kept if its environment exists on
the node and forgotten if not; a running one that should be stopped (an `up`
cut off by its node, which went on starting it) is stopped. It only acts on nodes it can reach: the
workspaces of a disconnected node are left alone (users see them `unknown`)
until the node returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from common.errors import NodeUnreachableError, VendettaError
from coordinator import services
from coordinator.agent_client import AgentClient
from coordinator.models import Desired, EnvironmentState, NodeState, WorkspaceState
from coordinator.nodes import NodeConnection
from coordinator.workspaces import WorkspaceService, config_of, observe, pinned_ports

log = logging.getLogger("vendetta.reconciler")

# Seconds between two passes over every ready node (besides the pass on each reconnect).
RECONCILE_INTERVAL = 30.0
# Seconds a stop the reconciler makes gives the processes inside (as `down` does).
STOP_TIMEOUT = 10.0
# How a workspace's detail says that its last reconcile failed.
_FAILED = "the reconciler failed: "


class Reconciler:
    def __init__(self, workspaces: WorkspaceService, interval: float | None = None) -> None:
        self.workspaces = workspaces
        self.store = workspaces.store
        self.nodes = workspaces.nodes
        self.interval = RECONCILE_INTERVAL if interval is None else interval
        # One pass per node at a time: a tick skips a node whose pass is under way.
        self._passes: dict[str, asyncio.Lock] = {}
        self._ticker: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Reconcile on every node (re)connect, and on a periodic tick."""
        if self._ticker is None:
            self.nodes.on_ready(self.on_ready)
            self._ticker = asyncio.create_task(self._tick_forever(), name="reconciler")

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None

    async def on_ready(self, conn: NodeConnection) -> None:
        # A new connection: forwards and relays through the old one died with it.
        await self.reconcile_node(conn, reconnected=True)

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.tick()
            except Exception:  # one bad pass must not end the ticks
                log.exception("reconciler tick failed")

    async def tick(self) -> None:
        """One pass over every ready node whose pass is not already under way (in parallel:
        a slow node does not hold the others back)."""
        due = [
            conn
            for conn in self.nodes.all()
            if conn.state == NodeState.READY and not self._pass(conn.name).locked()
        ]
        results = await asyncio.gather(
            *(self.reconcile_node(conn) for conn in due), return_exceptions=True
        )
        for conn, result in zip(due, results, strict=True):
            if isinstance(result, Exception):
                log.error("reconcile of node %s failed: %r", conn.name, result)

    def _pass(self, node: str) -> asyncio.Lock:
        return self._passes.setdefault(node, asyncio.Lock())

    async def reconcile_node(self, conn: NodeConnection, *, reconnected: bool = False) -> None:
        """Observe every workspace of the node, then act on its desired state."""
        async with self._pass(conn.name):
            try:
                client = await conn.client(wait=0)
                names = [ws.name for ws in await self.store.list_workspaces(conn.name)]
            except VendettaError as exc:
                log.warning("reconcile of node %s skipped: %s", conn.name, exc)
                return
            for name in names:
                if not reconnected and self.workspaces.lock(name).locked():
                    continue  # a command is at work on it: the next tick looks again
                try:
                    await self.reconcile_workspace(client, name, reconnected=reconnected)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if conn.state != NodeState.READY or isinstance(exc, NodeUnreachableError):
                        # The node went away: its next connect starts a new pass.
                        log.warning("reconcile of node %s stopped: %s", conn.name, exc)
                        return
                    log.warning("reconcile of workspace %s failed: %s", name, exc)
                    await self._record_failure(name, exc)

    async def _record_failure(self, name: str, exc: Exception) -> None:
        detail = f"{_FAILED}{exc}"
        try:
            async with self.workspaces.lock(name):
                ws = await self.store.get_workspace(name)
                if ws is not None and ws.detail != detail:  # said once, not on every tick
                    ws.detail = detail
                    await self.workspaces.save(ws, detail)
        except Exception:  # the failure is logged already; the pass goes on
            log.exception("could not record the reconcile failure of workspace %s", name)

    async def reconcile_workspace(
        self, client: AgentClient, name: str, *, reconnected: bool = False
    ) -> None:
        async with self.workspaces.lock(name):
            ws = await self.store.get_workspace(name)
            if ws is None:
                return
            # Under the lock, `creating` and `destroying` are never a command still at work
            # (commands hold the lock throughout): they are what a crash left behind.
            if ws.observed == WorkspaceState.DESTROYING:
                await client.destroy(ws.name, ws.provider)
                await self.workspaces.sources.remove(ws, client)  # the node's copy too
                await self.workspaces.forget(ws, "destroyed (finished by the reconciler)")
                return
            env = await client.inspect(ws.name, ws.provider)
            if ws.observed == WorkspaceState.CREATING:
                if env.state == EnvironmentState.ABSENT:
                    # Whatever the agent may still be making for it goes too.
                    await client.destroy(ws.name, ws.provider)
                    await self.workspaces.sources.remove(ws, client)
                    await self.workspaces.forget(ws, "create rolled back by the reconciler")
                    return
                observe(ws, env)
                await self.workspaces.save(ws, "created (finished by the reconciler)")
                return
            before = ws.observed
            recovered = ws.detail.startswith(_FAILED)  # an earlier pass failed, this one not
            observe(ws, env)
            started = False  # services started here: their relay and forwards are set
            if ws.desired == Desired.RUNNING and ws.observed == WorkspaceState.STOPPED:
                observe(ws, await client.start(ws.name, ws.provider))
                await self.workspaces.save(ws, "restarted by the reconciler (desired: running)")
                specs = services.service_specs(config_of(ws))
                if specs:
                    with contextlib.suppress(VendettaError):
                        await self.workspaces.start_services(ws, client, specs)
                        started = True
            elif ws.desired == Desired.STOPPED and ws.observed == WorkspaceState.RUNNING:
                # An `up` whose node went away mid-start (the engine went on: a guest
                # boots on), or a `down` that failed: the last command's word stands.
                observe(ws, await client.stop(ws.name, ws.provider, STOP_TIMEOUT))
                relays = self.workspaces.relays
                await relays.settle(ws, client)  # the services' final states, as `down`
                relays.detach(ws.name)
                await self.workspaces.save(ws, "stopped by the reconciler (desired: stopped)")
            elif ws.observed != before or recovered:
                await self.workspaces.save(ws, f"observed {ws.observed.value}")
            relays = self.workspaces.relays
            # On a tick, a running workspace whose relay still flows needs nothing more.
            if (
                ws.observed == WorkspaceState.RUNNING
                and not started
                and (reconnected or not relays.alive(ws.name))
            ):
                # The agent kept supervising the services: pick their state up again.
                relays.update(ws.name, await client.get_services(ws.name, ws.provider))
                relays.start(ws, client)
                if reconnected:  # forwards through a dropped connection died with it
                    relays.ports.close_workspace(ws.name)
                await relays.forward(ws, pinned_ports(config_of(ws)))
