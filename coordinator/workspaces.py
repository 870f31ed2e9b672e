"""Workspace commands: users set the desired state, the agent's answers the observed one.

What keeps them together afterwards lives elsewhere: the reconciler
(``coordinator.reconciler``) and the service relays and port forwards
(``coordinator.relays``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

from common.config import PROVIDERS, ProjectConfig, parse_config
from common.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NodeUnreachableError,
    NotFoundError,
    UnavailableError,
    VendettaError,
)
from common.events import EventBus
from common.names import validate_name
from common.paths import vendetta_home
from coordinator import rebuild, services
from coordinator.agent_client import AgentClient, NodeLostError
from coordinator.models import (
    LOCAL_NODE,
    Desired,
    Environment,
    EnvironmentState,
    NodeState,
    ServiceState,
    ServiceStatus,
    Transfer,
    WorkspaceRecord,
    WorkspaceState,
)
from coordinator.nodes import NodeRegistry
from coordinator.orphans import coordinator_id, taken_advice
from coordinator.ports import PortManager
from coordinator.relays import ServiceRelays
from coordinator.store import Store
from coordinator.workspace_source import WorkspaceSources
from vendetta.v1 import common_pb2

_ENV_STATE = {
    EnvironmentState.RUNNING: WorkspaceState.RUNNING,
    EnvironmentState.STOPPED: WorkspaceState.STOPPED,
    EnvironmentState.CREATED: WorkspaceState.STOPPED,
}
_ALIASES = {"lxc": "lxd", "kvm": "qemu"}


@dataclass
class WorkspaceEvent:
    workspace: WorkspaceRecord
    message: str
    time_unix_nano: int
    service: ServiceStatus | None = None
    transfer: Transfer | None = None  # a transfer of its source in progress


class WorkspaceService:
    def __init__(self, store: Store, nodes: NodeRegistry, home: Path | None = None) -> None:
        self.store = store
        self.nodes = nodes
        self.sources = WorkspaceSources(
            home or vendetta_home(), lambda ws, msg, t: self.publish(ws, msg, transfer=t)
        )
        self.ports = PortManager(store, nodes)
        self.events: EventBus[WorkspaceEvent] = EventBus()
        self.relays = ServiceRelays(self.ports, self.publish)
        # Labelled on every environment made, to tell this coordinator's from another's.
        self.owner = coordinator_id(home or vendetta_home())
        # One operation at a time per workspace: up during destroy must not race.
        self._locks: dict[str, asyncio.Lock] = {}

    def lock(self, name: str) -> asyncio.Lock:
        """Held by every command and by the reconciler while they change a workspace."""
        return self._locks.setdefault(name, asyncio.Lock())

    def publish(
        self,
        ws: WorkspaceRecord,
        message: str,
        service: ServiceStatus | None = None,
        transfer: Transfer | None = None,
    ) -> None:
        self.events.publish(WorkspaceEvent(ws, message, time.time_ns(), service, transfer))

    def service_statuses(self, name: str) -> list[ServiceStatus]:
        return self.relays.statuses(name)

    async def save(self, ws: WorkspaceRecord, message: str = "") -> None:
        await self.store.update_workspace(ws)
        self.publish(ws, message)

    def view(self, ws: WorkspaceRecord) -> WorkspaceRecord:
        """What users see: `unknown` while the node is away, whatever we last saw."""
        with contextlib.suppress(NotFoundError):
            if self.nodes.get(ws.node).state != NodeState.READY and ws.observed in (
                WorkspaceState.RUNNING,
                WorkspaceState.STOPPED,
            ):
                return replace(ws, observed=WorkspaceState.UNKNOWN)
        return ws

    async def get(self, name: str) -> WorkspaceRecord:
        ws = await self.store.get_workspace(name)
        if ws is None:
            validate_name("workspace", name)  # a bad name: the rule, not "create it with" it
            known = [w.name for w in await self.store.list_workspaces()]
            raise NotFoundError(
                f"unknown workspace {name!r} (known: {', '.join(known) or 'none'}); "
                f"create it with `vendetta workspace create {name}`"
            )
        return ws

    async def list_all(self, node: str = "") -> list[WorkspaceRecord]:
        return await self.store.list_workspaces(node)

    async def create(
        self,
        name: str,
        provider: str,
        node: str,
        config_yaml: str,
        config_path: str,
        *,
        source: str = "",
        branch: str = "",
        with_changes: bool = False,
    ) -> WorkspaceRecord:
        validate_name("workspace", name)
        cfg = parse_config(config_yaml, config_path or "config") if config_yaml.strip() else None
        provider = _ALIASES.get(provider, provider) or (cfg.provider if cfg else "docker")
        if provider not in PROVIDERS:
            raise InvalidArgumentError(
                f"unknown provider {provider!r}: use one of {', '.join(PROVIDERS)} (or lxc)"
            )
        node = node or (cfg.remote.node if cfg and cfg.remote else LOCAL_NODE)
        conn = self.nodes.get(node)
        async with self.lock(name), self._outcome_unknown(name, "create"):
            if (existing := await self.store.get_workspace(name)) is not None:
                raise AlreadyExistsError(
                    f"workspace {name!r} already exists on node {existing.node!r}: pick another "
                    f"name, or remove it first with `vendetta workspace destroy {name}`"
                )
            spec = services.environment_spec(name, provider, cfg)
            spec.owner = self.owner
            ws = WorkspaceRecord(
                name=name,
                node=node,
                provider=provider,
                image=spec.image,
                config_yaml=config_yaml,
                config_path=config_path,
            )
            client = await conn.client()
            # An environment of that name no workspace here owns (another coordinator's
            # on the same node user, or an orphan): refused before its source, which the
            # agent keeps by name, is overwritten or discarded.
            if (await client.inspect(name, provider)).state != EnvironmentState.ABSENT:
                raise AlreadyExistsError(taken_advice(name, node))
            # The source first: a bad one stops here, before anything else is made.
            # QEMU copies the source into its guest, where a worktree's .git would point at
            # a repository it lacks: the local node gets a shipped copy too (standalone .git).
            live = conn.record.transport == "local" and provider != "qemu"
            await self.sources.prepare(ws, cfg, live, client, spec, source, branch, with_changes)
            # Recorded as `creating` first: should the coordinator die before the agent
            # answers, the reconciler finishes or rolls back the record.
            await self.store.add_workspace(ws)
            self.publish(ws, f"creating {provider} environment on node {node}")
            try:
                env = await client.create(spec)
            except NodeLostError:
                raise  # it may exist on the node: kept `creating`, for the reconciler
            except BaseException as exc:
                # Nothing half-created: forget the record, and remove whatever the
                # agent may have made before the failure reached us.
                if not isinstance(exc, VendettaError) or isinstance(exc, UnavailableError):
                    with contextlib.suppress(Exception):
                        await client.destroy(name, provider)
                await self.store.delete_workspace(name)
                await self.sources.discard(ws, client)
                ws.observed = WorkspaceState.DESTROYED
                self.publish(ws, f"create failed: {exc}")
                if isinstance(exc, AlreadyExistsError) and "already has an environment" in str(exc):
                    raise AlreadyExistsError(taken_advice(name, node)) from exc  # no record here
                raise
            ws.observed = WorkspaceState.STOPPED
            ws.environment_id = env.id
            ws.addresses = list(env.addresses)
            ws.source.mode = env.source_mode
            ws.source.workdir = env.workdir or ws.source.workdir
            await self.save(ws, "created")
            return ws

    async def up(self, name: str) -> WorkspaceRecord:
        try:
            return await self._up(name)
        except VendettaError as exc:  # says what applies a fix
            if (told := rebuild.explained(name, exc)) is exc:
                raise
            raise told from exc

    async def _up(self, name: str) -> WorkspaceRecord:
        async with self.lock(name), self._outcome_unknown(name, "up"):
            ws = await self.get(name)
            await rebuild.refresh(self, ws)  # the config in its source, and what changed
            conn = self.nodes.get(ws.node)
            client = await conn.client()
            self.ports.check_pinned(ws.name, pinned_ports(config_of(ws)))
            previous = ws.desired
            ws.desired, ws.observed, ws.detail = Desired.RUNNING, WorkspaceState.STARTING, ""
            await self.save(ws, f"starting environment on node {ws.node}")
            try:
                env = await client.start(name, ws.provider)
            except VendettaError as exc:
                ws.desired, ws.observed, ws.detail = previous, WorkspaceState.ERROR, str(exc)
                await self.save(ws, f"start failed: {exc}")
                raise
            observe(ws, env)
            await self.save(ws, "environment running")
            cfg = config_of(ws)
            if cfg and cfg.hooks and cfg.hooks.setup and not ws.setup_done:
                await self._hook(ws, client, "setup", cfg.hooks.setup)
                ws.setup_done = True
                await self.save(ws, "setup hook done")
            specs = services.service_specs(cfg)
            if specs:
                await self.start_services(ws, client, specs)
            return ws

    async def _hook(self, ws: WorkspaceRecord, client: AgentClient, name: str, cmd: str) -> None:
        self.publish(ws, f"running the {name} hook")
        code = await client.run_hook(ws.name, ws.provider, name, cmd)
        if code != 0:
            raise FailedPreconditionError(
                f"the {name} hook of workspace {ws.name!r} exited with code {code}; its output: "
                f"`vendetta workspace logs {ws.name} --service hook-{name}`"
            )

    async def start_services(
        self, ws: WorkspaceRecord, client: AgentClient, specs: list[common_pb2.ServiceSpec]
    ) -> None:
        """Start the config's services in order, then relay and forward them.

        Raises FailedPreconditionError when not all of them became healthy.
        """
        self.relays.stop(ws.name)
        self.relays.expect(ws.name, [s.name for s in specs])
        async for ev in client.start_services(ws.name, ws.provider, specs):
            self.relays.record(ws, ev)
        self.relays.start(ws, client)
        await self.relays.forward(ws, pinned_ports(config_of(ws)))
        statuses = self.service_statuses(ws.name)
        if any(s.state != ServiceState.HEALTHY for s in statuses):
            ws.detail = "some services failed"
            await self.save(ws, "services failed")
            raise FailedPreconditionError(
                f"workspace {ws.name!r} is running, but not all its services are healthy:\n"
                f"{services.failure_summary(statuses)}\n"
                f"see `vendetta workspace logs {ws.name} --service NAME`; fix the config and "
                f"run `vendetta workspace up {ws.name}` again"
            )
        await self.save(ws, f"{len(statuses)} services healthy")

    async def down(self, name: str, timeout: float = 10.0) -> WorkspaceRecord:
        async with self.lock(name), self._outcome_unknown(name, "down"):
            ws = await self.get(name)
            client = await self.nodes.get(ws.node).client()
            ws.desired, ws.observed, ws.detail = Desired.STOPPED, WorkspaceState.STOPPING, ""
            await self.save(ws, "stopping environment")
            try:
                env = await client.stop(name, ws.provider, timeout)
                await self.relays.settle(ws, client)  # then detached, with no await between
            except VendettaError as exc:
                ws.observed, ws.detail = WorkspaceState.ERROR, str(exc)
                await self.save(ws, f"stop failed: {exc}")
                raise
            finally:
                self.relays.detach(name)
            observe(ws, env)
            await self.save(ws, "environment stopped")
            return ws

    async def destroy(self, name: str, force: bool = False) -> str:
        """Destroy the workspace; what of its source is kept, for the user ("" if none)."""
        async with self.lock(name), self._outcome_unknown(name, "destroy"):
            ws = await self.get(name)
            client: AgentClient | None = None
            try:
                client = await self.nodes.get(ws.node).client()
            except (UnavailableError, NotFoundError) as exc:
                if not force:
                    raise UnavailableError(
                        f"{exc} Nothing was destroyed. To forget the workspace anyway (its "
                        f"environment stays on the node), use `vendetta workspace destroy "
                        f"{name} --force`"
                    ) from exc
            else:
                if not force:  # before anything goes: work that exists nowhere else
                    await self.sources.check_destroy(ws, client)
                cfg = config_of(ws)
                teardown = cfg.hooks.teardown if cfg and cfg.hooks else None
                if teardown and ws.observed == WorkspaceState.RUNNING:
                    with contextlib.suppress(VendettaError):  # a failing teardown must not block
                        await self._hook(ws, client, "teardown", teardown)
                self.relays.detach(name)  # before the environment goes, not after
                # Recorded first: should the coordinator die now, the reconciler finishes.
                ws.observed = WorkspaceState.DESTROYING
                await self.save(ws, "destroying environment")
                try:
                    await client.destroy(name, ws.provider)
                except VendettaError as exc:
                    ws.observed, ws.detail = WorkspaceState.ERROR, str(exc)
                    await self.save(ws, f"destroy failed: {exc}")
                    raise
            kept = await self.sources.remove(ws, client)
            # Also on the --force path, where the node was never reached.
            await self.forget(ws, "destroyed" + (f"; {kept}" if kept else ""))
            return kept

    async def transfer(self, name: str, kind: str, force: bool) -> AsyncIterator[Transfer]:
        """`push` or `pull` a workspace's source: its progress, then what it did (done)."""
        async with self.lock(name):
            ws = await self.get(name)
            client = await self.nodes.get(ws.node).client()
            progress: asyncio.Queue[Transfer] = asyncio.Queue()
            if kind == "push":
                run = self.sources.push(ws, config_of(ws), client, progress.put_nowait)
            else:
                run = self.sources.pull(ws, client, force, progress.put_nowait)
            task = asyncio.create_task(run)
            try:
                while not task.done():
                    getter = asyncio.create_task(progress.get())
                    await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
                    if getter.done():
                        yield getter.result()
                    else:
                        getter.cancel()
                done = await task
            finally:
                task.cancel()
            await self.save(ws, done.summary)
            yield done

    @contextlib.asynccontextmanager
    async def _outcome_unknown(self, name: str, op: str) -> AsyncIterator[None]:
        """A node that goes away during `op` leaves its outcome unknown: the workspace
        says so (`unknown`; a destroy stays `destroying`, for the reconciler to finish)
        until the reconciler sees it again, and the error says what to do."""
        try:
            yield
        except NodeLostError as exc:
            ws = await self.store.get_workspace(name)
            # What the reconciler does with it once the node is back, and what is left to do.
            after = {
                "destroy": "the reconciler finishes destroying it once the node is back",
                "create": "the reconciler keeps it if its environment was made, or removes it, "
                "once the node is back",
            }
            hint = after.get(op, "") if ws is not None else ""
            hint = hint or (
                f"run `vendetta workspace {op} {name}` again once "
                f"`vendetta node status {exc.node}` says ready"
            )
            message = (
                f"node {exc.node!r} stopped answering during `{op}` of workspace {name!r} "
                f"({exc.why}); what became of it is unknown until the node is back: {hint}"
            )
            if ws is not None:
                if op == "destroy":
                    ws.observed = WorkspaceState.DESTROYING
                elif op != "create":  # a create stays `creating`
                    ws.observed = WorkspaceState.UNKNOWN
                ws.detail = message
                await self.save(ws, message)
            raise NodeUnreachableError(message) from exc

    async def forget(self, ws: WorkspaceRecord, message: str) -> None:
        """Drop every trace of a workspace whose environment is gone (or left on purpose).

        The caller holds the workspace's lock.
        """
        await self.sources.remove(ws, None)  # the worktree, if destroy has not yet
        self.relays.forget(ws.name)
        await self.store.delete_ports(ws.name)
        await self.store.delete_workspace(ws.name)
        ws.observed = WorkspaceState.DESTROYED
        self.publish(ws, message)
        self._locks.pop(ws.name, None)

    async def logs(
        self,
        name: str,
        *,
        follow: bool,
        tail: int,
        since_unix_nano: int,
        service: str,
        compact: bool = False,
    ) -> AsyncIterator[common_pb2.LogBatch]:
        ws = await self.get(name)
        client = await self.nodes.get(ws.node).client()
        # The agent's batches pass through as they are: no work per line here.
        async for batch in client.logs(
            name,
            ws.provider,
            follow=follow,
            tail=tail,
            since_unix_nano=since_unix_nano,
            service=service,
            compact=compact,
        ):
            yield batch

    async def exec(
        self, name: str, argv: list[str], env: dict[str, str], workdir: str
    ) -> AsyncIterator[common_pb2.ExecOutput]:
        ws = await self.get(name)
        client = await self.nodes.get(ws.node).client()
        async for out in client.exec(name, ws.provider, argv, env, workdir):
            yield out

    async def connect(
        self, requests: AsyncIterator[common_pb2.AttachInput]
    ) -> AsyncIterator[common_pb2.ExecOutput]:
        """Relay a session between a client and the workspace's agent."""
        first = await anext(aiter(requests), None)
        if first is None or first.WhichOneof("input") != "start":
            raise InvalidArgumentError("a connect stream starts with a `start` message")
        ws = await self.get(first.start.workspace)
        if ws.observed != WorkspaceState.RUNNING:
            raise FailedPreconditionError(
                f"workspace {ws.name!r} is {ws.observed.value}: start it with "
                f"`vendetta workspace up {ws.name}`"
            )
        client = await self.nodes.get(ws.node).client()
        first.start.provider = ws.provider

        async def forward() -> AsyncIterator[common_pb2.AttachInput]:
            yield first
            async for msg in requests:
                yield msg

        async for out in client.attach(forward()):
            yield out


def observe(ws: WorkspaceRecord, env: Environment) -> None:
    """Take what the agent reports of the environment into the record."""
    if env.state == EnvironmentState.ABSENT:
        ws.observed = WorkspaceState.ERROR
        ws.detail = (
            f"its environment is missing on node {ws.node}: make a new one with "
            f"`vendetta workspace rebuild {ws.name}` (or `vendetta workspace destroy {ws.name}`)"
        )
        return
    ws.observed = _ENV_STATE.get(env.state, WorkspaceState.UNKNOWN)
    ws.environment_id = env.id or ws.environment_id
    ws.addresses = list(env.addresses)
    ws.detail = env.detail


def config_of(ws: WorkspaceRecord) -> ProjectConfig | None:
    if not ws.config_yaml.strip():
        return None
    return parse_config(ws.config_yaml, ws.config_path or "config")


def pinned_ports(cfg: ProjectConfig | None) -> dict[str, int]:
    """The services' local ports the config names explicitly."""
    if cfg is None:
        return {}
    return {n: s.local_port for n, s in cfg.services.items() if s.local_port is not None}
