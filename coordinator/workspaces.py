"""Workspace lifecycle: desired state from users, observed state from agents."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from common.config import PROVIDERS, ProjectConfig, parse_config, parse_size
from common.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
    VendettaError,
)
from common.events import EventBus
from common.names import validate_name
from coordinator import services
from coordinator.agent_client import AgentClient
from coordinator.models import LOCAL_NODE, Desired, NodeState, WorkspaceRecord, WorkspaceState
from coordinator.nodes import NodeConnection, NodeRegistry
from coordinator.ports import PortManager
from coordinator.store import Store
from vendetta.v1 import common_pb2, nodeagent_pb2

log = logging.getLogger("vendetta.workspaces")

_ENV_STATE = {
    common_pb2.ENVIRONMENT_STATE_RUNNING: WorkspaceState.RUNNING,
    common_pb2.ENVIRONMENT_STATE_STOPPED: WorkspaceState.STOPPED,
    common_pb2.ENVIRONMENT_STATE_CREATED: WorkspaceState.STOPPED,
}
_ALIASES = {"lxc": "lxd", "kvm": "qemu"}


@dataclass
class WorkspaceEvent:
    workspace: WorkspaceRecord
    message: str
    time_unix_nano: int
    service: common_pb2.ServiceStatus | None = None


class WorkspaceService:
    def __init__(self, store: Store, nodes: NodeRegistry) -> None:
        self.store = store
        self.nodes = nodes
        self.ports = PortManager(store, nodes)
        self.events: EventBus[WorkspaceEvent] = EventBus()
        # One operation at a time per workspace: up during destroy must not race.
        self._locks: dict[str, asyncio.Lock] = {}
        # Last known state of each workspace's services, kept fresh by a relay of
        # the agent's service events while the workspace runs.
        self.services: dict[str, dict[str, common_pb2.ServiceStatus]] = {}
        self._relays: dict[str, asyncio.Task[None]] = {}

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def _publish(
        self, ws: WorkspaceRecord, message: str, service: common_pb2.ServiceStatus | None = None
    ) -> None:
        self.events.publish(WorkspaceEvent(ws, message, time.time_ns(), service))

    def service_statuses(self, name: str) -> list[common_pb2.ServiceStatus]:
        statuses = list(self.services.get(name, {}).values())
        self.ports.annotate(name, statuses)
        return statuses

    async def _forward_ports(self, ws: WorkspaceRecord) -> None:
        statuses = self.service_statuses(ws.name)
        for note in await self.ports.ensure(ws.name, ws.node, statuses, _pinned(_config(ws))):
            self._publish(ws, note)

    def _service_event(self, ws: WorkspaceRecord, ev: common_pb2.ServiceEvent) -> None:
        self.services.setdefault(ws.name, {})[ev.service.name] = ev.service
        self._publish(ws, ev.message, ev.service)

    def _start_relay(self, ws: WorkspaceRecord, client: AgentClient) -> None:
        """Keep service state and events flowing while the workspace runs."""
        self._stop_relay(ws.name)

        async def relay() -> None:
            with contextlib.suppress(VendettaError):
                async for ev in client.watch_services(ws.name, ws.provider):
                    self._service_event(ws, ev)

        self._relays[ws.name] = asyncio.create_task(relay(), name=f"relay-{ws.name}")

    def _stop_relay(self, name: str) -> None:
        task = self._relays.pop(name, None)
        if task is not None:
            task.cancel()

    async def _save(self, ws: WorkspaceRecord, message: str = "") -> None:
        await self.store.update_workspace(ws)
        self._publish(ws, message)

    def view(self, ws: WorkspaceRecord) -> WorkspaceRecord:
        """What users see: `unknown` while the node is away, whatever we last saw."""
        with contextlib.suppress(NotFoundError):
            if self.nodes.get(ws.node).state != NodeState.READY and ws.observed in (
                WorkspaceState.RUNNING,
                WorkspaceState.STOPPED,
            ):
                return WorkspaceRecord(**{**vars(ws), "observed": WorkspaceState.UNKNOWN})
        return ws

    async def get(self, name: str) -> WorkspaceRecord:
        ws = await self.store.get_workspace(name)
        if ws is None:
            known = [w.name for w in await self.store.list_workspaces()]
            raise NotFoundError(
                f"unknown workspace {name!r} (known: {', '.join(known) or 'none'}); "
                f"create it with `vendetta workspace create {name}`"
            )
        return ws

    async def list_all(self, node: str = "") -> list[WorkspaceRecord]:
        return await self.store.list_workspaces(node)

    async def create(
        self, name: str, provider: str, node: str, config_yaml: str, config_path: str
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
        async with self._lock(name):
            if (existing := await self.store.get_workspace(name)) is not None:
                raise AlreadyExistsError(
                    f"workspace {name!r} already exists on node {existing.node!r}: pick another "
                    f"name, or remove it first with `vendetta workspace destroy {name}`"
                )
            spec = _spec(name, provider, cfg)
            spec.ports.extend(services.ports(cfg))
            ws = WorkspaceRecord(
                name=name,
                node=node,
                provider=provider,
                image=spec.image,
                config_yaml=config_yaml,
                config_path=config_path,
            )
            client = await conn.client()
            await self.store.add_workspace(ws)
            self._publish(ws, f"creating {provider} environment on node {node}")
            try:
                env = await client.create(spec)
            except BaseException as exc:
                # Nothing half-created: forget the record, and remove whatever the
                # agent may have made before the failure reached us.
                if not isinstance(exc, VendettaError) or isinstance(exc, UnavailableError):
                    with contextlib.suppress(Exception):
                        await client.destroy(name, provider)
                await self.store.delete_workspace(name)
                ws.observed = WorkspaceState.DESTROYED
                self._publish(ws, f"create failed: {exc}")
                raise
            ws.observed = WorkspaceState.STOPPED
            ws.environment_id = env.id
            ws.addresses = list(env.addresses)
            await self._save(ws, "created")
            return ws

    async def up(self, name: str) -> WorkspaceRecord:
        async with self._lock(name):
            ws = await self.get(name)
            conn = self.nodes.get(ws.node)
            client = await conn.client()
            self.ports.check_pinned(ws.name, _pinned(_config(ws)))
            previous = ws.desired
            ws.desired, ws.observed, ws.detail = Desired.RUNNING, WorkspaceState.STARTING, ""
            await self._save(ws, f"starting environment on node {ws.node}")
            try:
                env = await client.start(name, ws.provider)
            except VendettaError as exc:
                ws.desired, ws.observed, ws.detail = previous, WorkspaceState.ERROR, str(exc)
                await self._save(ws, f"start failed: {exc}")
                raise
            self._observe(ws, env)
            await self._save(ws, "environment running")
            cfg = _config(ws)
            if cfg and cfg.hooks and cfg.hooks.setup and not ws.setup_done:
                await self._hook(ws, client, "setup", cfg.hooks.setup)
                ws.setup_done = True
                await self._save(ws, "setup hook done")
            specs = services.service_specs(cfg)
            if specs:
                await self._start_services(ws, client, specs)
            return ws

    async def _hook(self, ws: WorkspaceRecord, client: AgentClient, name: str, cmd: str) -> None:
        self._publish(ws, f"running the {name} hook")
        code = -1
        async for out in client.run_hook(ws.name, ws.provider, name, cmd):
            if out.WhichOneof("output") == "exit_code":
                code = out.exit_code
        if code != 0:
            raise FailedPreconditionError(
                f"the {name} hook of workspace {ws.name!r} exited with code {code}; its output: "
                f"`vendetta workspace logs {ws.name} --service hook-{name}`"
            )

    async def _start_services(
        self, ws: WorkspaceRecord, client: AgentClient, specs: list[common_pb2.ServiceSpec]
    ) -> None:
        self._stop_relay(ws.name)
        self.services[ws.name] = {s.name: common_pb2.ServiceStatus(name=s.name) for s in specs}
        async for ev in client.start_services(ws.name, ws.provider, specs):
            self._service_event(ws, ev)
        self._start_relay(ws, client)
        await self._forward_ports(ws)
        statuses = self.service_statuses(ws.name)
        if any(s.state != common_pb2.SERVICE_STATE_HEALTHY for s in statuses):
            ws.detail = "some services failed"
            await self._save(ws, "services failed")
            raise FailedPreconditionError(
                f"workspace {ws.name!r} is running, but not all its services are healthy:\n"
                f"{services.failure_summary(statuses)}\n"
                f"see `vendetta workspace logs {ws.name} --service NAME`; fix the config and "
                f"run `vendetta workspace up {ws.name}` again"
            )
        await self._save(ws, f"{len(statuses)} services healthy")

    async def down(self, name: str, timeout: float = 10.0) -> WorkspaceRecord:
        async with self._lock(name):
            ws = await self.get(name)
            client = await self.nodes.get(ws.node).client()
            ws.desired, ws.observed, ws.detail = Desired.STOPPED, WorkspaceState.STOPPING, ""
            await self._save(ws, "stopping environment")
            try:
                env = await client.stop(name, ws.provider, timeout)
            except VendettaError as exc:
                ws.observed, ws.detail = WorkspaceState.ERROR, str(exc)
                await self._save(ws, f"stop failed: {exc}")
                raise
            finally:
                self._stop_relay(name)
                self.ports.close_workspace(name)
            self._observe(ws, env)
            await self._save(ws, "environment stopped")
            return ws

    async def destroy(self, name: str, force: bool = False) -> None:
        async with self._lock(name):
            ws = await self.get(name)
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
                cfg = _config(ws)
                teardown = cfg.hooks.teardown if cfg and cfg.hooks else None
                if teardown and ws.observed == WorkspaceState.RUNNING:
                    with contextlib.suppress(VendettaError):  # a failing teardown must not block
                        await self._hook(ws, client, "teardown", teardown)
                self._stop_relay(name)  # before the environment goes, not after
                self.ports.close_workspace(name)
                ws.observed = WorkspaceState.DESTROYING
                await self._save(ws, "destroying environment")
                try:
                    await client.destroy(name, ws.provider)
                except VendettaError as exc:
                    ws.observed, ws.detail = WorkspaceState.ERROR, str(exc)
                    await self._save(ws, f"destroy failed: {exc}")
                    raise
            # Also on the --force path, where the node was never reached.
            self._stop_relay(name)
            self.ports.close_workspace(name)
            await self.store.delete_ports(name)
            await self.store.delete_workspace(name)
            ws.observed = WorkspaceState.DESTROYED
            self._publish(ws, "destroyed")
        self._locks.pop(name, None)
        self.services.pop(name, None)

    async def logs(
        self, name: str, *, follow: bool, tail: int, since_unix_nano: int, service: str
    ) -> AsyncIterator[common_pb2.LogBatch]:
        ws = await self.get(name)
        client = await self.nodes.get(ws.node).client()
        request = nodeagent_pb2.AgentLogsRequest(
            workspace=name,
            provider=ws.provider,
            follow=follow,
            tail=tail,
            since_unix_nano=since_unix_nano,
            service=service,
        )
        async for batch in client.logs(request):
            yield batch

    async def exec(
        self, name: str, argv: list[str], env: dict[str, str], workdir: str
    ) -> AsyncIterator[common_pb2.ExecOutput]:
        ws = await self.get(name)
        client = await self.nodes.get(ws.node).client()
        request = nodeagent_pb2.ExecRequest(
            workspace=name, provider=ws.provider, argv=argv, env=env, workdir=workdir
        )
        async for out in client.exec(request):
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

    def _observe(self, ws: WorkspaceRecord, env: nodeagent_pb2.Environment) -> None:
        if env.state == common_pb2.ENVIRONMENT_STATE_ABSENT:
            ws.observed = WorkspaceState.ERROR
            ws.detail = (
                f"its environment is missing on node {ws.node}: recreate it with "
                f"`vendetta workspace destroy {ws.name}` then `create`"
            )
            return
        ws.observed = _ENV_STATE.get(env.state, WorkspaceState.UNKNOWN)
        ws.environment_id = env.id or ws.environment_id
        ws.addresses = list(env.addresses)
        ws.detail = env.detail

    async def reconcile_node(self, conn: NodeConnection) -> None:
        """On (re)connect: observe every workspace of the node, then act on desired state."""
        try:
            client = await conn.client(wait=0)
            for ws in await self.store.list_workspaces(conn.name):
                async with self._lock(ws.name):
                    fresh = await self.store.get_workspace(ws.name)
                    if fresh is None or fresh.observed in (
                        WorkspaceState.CREATING,
                        WorkspaceState.DESTROYING,
                    ):
                        continue
                    before = fresh.observed
                    self._observe(fresh, await client.inspect(fresh.name, fresh.provider))
                    started = False  # services started here: relay and forwards are set
                    if (
                        fresh.desired == Desired.RUNNING
                        and fresh.observed == WorkspaceState.STOPPED
                    ):
                        self._observe(fresh, await client.start(fresh.name, fresh.provider))
                        await self._save(fresh, "restarted by the reconciler (desired: running)")
                        specs = services.service_specs(_config(fresh))
                        if specs:
                            with contextlib.suppress(VendettaError):
                                await self._start_services(fresh, client, specs)
                                started = True
                    elif fresh.observed != before:
                        await self._save(fresh, f"observed {fresh.observed.value}")
                    if fresh.observed == WorkspaceState.RUNNING and not started:
                        # The agent kept supervising the services: pick their state up again.
                        for st in await client.get_services(fresh.name, fresh.provider):
                            self.services.setdefault(fresh.name, {})[st.name] = st
                        self._start_relay(fresh, client)
                        # Forwards through a dropped SSH connection died with it.
                        self.ports.close_workspace(fresh.name)
                        await self._forward_ports(fresh)
        except VendettaError as exc:
            log.warning("reconcile of node %s stopped: %s", conn.name, exc)


def _config(ws: WorkspaceRecord) -> ProjectConfig | None:
    if not ws.config_yaml.strip():
        return None
    return parse_config(ws.config_yaml, ws.config_path or "config")


def _pinned(cfg: ProjectConfig | None) -> dict[str, int]:
    """The services' local ports the config names explicitly."""
    if cfg is None:
        return {}
    return {n: s.local_port for n, s in cfg.services.items() if s.local_port is not None}


def _spec(name: str, provider: str, cfg: ProjectConfig | None) -> nodeagent_pb2.EnvironmentSpec:
    cfg = cfg or ProjectConfig(name=name)
    spec = nodeagent_pb2.EnvironmentSpec(workspace=name, provider=provider)
    if provider == "docker":
        spec.image = cfg.docker.image
        spec.command.extend(cfg.docker.command or [])
    elif provider == "lxd":
        spec.image = cfg.lxd.image
        spec.cpus = cfg.lxd.cpu or 0
        spec.memory_bytes = parse_size(cfg.lxd.memory) if cfg.lxd.memory else 0
    else:
        spec.image = cfg.qemu.image
        spec.cpus = cfg.qemu.cpu
        spec.memory_bytes = parse_size(cfg.qemu.memory)
        spec.disk_bytes = parse_size(cfg.qemu.disk)
    return spec
