"""Fakes behind vendetta's own interfaces, and a whole in-process cluster made of them.

* :class:`FakeProvider` implements ``providers.base.Provider`` in memory.
* :class:`FakeTransport` implements ``coordinator.transports.Transport`` over an
  in-process agent's unix socket, with knobs to drop the "connection" and to
  make the node unreachable.
* :func:`running_cluster` starts real ``AgentServer``s (over FakeProviders) and a
  real ``Coordinator`` wired to them through FakeTransports, and tears them all
  down afterwards. Tests talk to the coordinator over its real gRPC socket.

Unix socket paths must stay under 107 bytes, so everything lives in a short
``/tmp/vd-*`` folder rather than pytest's long ``tmp_path``.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, cast

import asyncssh
import grpc.aio

from common.errors import (
    AlreadyExistsError,
    NodeUnreachableError,
    NotFoundError,
    NotRunningError,
)
from common.paths import DIAL_SOCKET
from coordinator.models import LOCAL_NODE, NodeRecord, NodeState
from coordinator.server import Coordinator
from coordinator.transports import Transport
from coordinator.transports.base import CHANNEL_OPTIONS, Forward
from coordinator.transports.tcp_proxy import TcpForward
from nodeagent.providers import ProviderSet
from nodeagent.server import AgentServer
from providers.base import (
    Capabilities,
    EnvironmentSpec,
    EnvironmentStatus,
    EnvState,
    ExecChunk,
    LogRecord,
    Provider,
    Readiness,
)
from vendetta.v1 import coordinator_pb2_grpc

# How long helpers wait for something that normally happens in milliseconds.
WAIT_TIMEOUT = 10.0
_POLL = 0.01


async def wait_until(
    predicate: Callable[[], Awaitable[bool]] | Callable[[], bool],
    what: str,
    timeout: float = WAIT_TIMEOUT,
) -> None:
    """Poll ``predicate`` (sync or async) until it is true; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(_POLL)


def short_tmp_dir() -> Path:
    """A fresh folder with a short path (unix sockets are limited to 107 bytes)."""
    return Path(tempfile.mkdtemp(prefix="vd-", dir="/tmp"))


def ssh_public_key_line() -> str:
    """A valid OpenSSH public key line, as `node add` pins."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    return key.export_public_key("openssh").decode().strip()


# --------------------------------------------------------------------------- provider


@dataclass
class FakeEnvironment:
    spec: EnvironmentSpec
    state: EnvState
    id: str
    # The environment's output; tests may append to it directly or via add_log.
    logs: list[LogRecord] = field(default_factory=list)


class FakeProvider(Provider):
    """An in-memory provider with the semantics documented in ``providers.base``.

    Failure hooks: set ``fail_create``/``fail_start``/``fail_stop``/``fail_destroy``
    to an exception to have the next calls raise it (until reset to None); put a
    workspace in ``broken`` to have every start, stop, inspect and destroy of that one
    environment raise the exception given (the others keep working).
    """

    name: ClassVar[str] = "docker"
    capabilities: ClassVar[Capabilities] = Capabilities()

    def __init__(self, agent_id: str = "fake-agent", *, name: str = "docker") -> None:
        super().__init__(agent_id)
        if name != type(self).name:
            self.name = name  # type: ignore[misc]  # a per-instance name, for ProviderSet keys
        self.environments: dict[str, FakeEnvironment] = {}
        self.readiness_value = Readiness(ready=True, detail="fake engine", version="0.0-fake")
        self.fail_create: Exception | None = None
        self.fail_start: Exception | None = None
        self.fail_stop: Exception | None = None
        self.fail_destroy: Exception | None = None
        self.broken: dict[str, Exception] = {}
        # exec: what the last chunk reports, and an optional stderr chunk.
        self.exec_exit_code = 0
        self.exec_stderr = b""
        self.calls: list[tuple[str, str]] = []  # (method, workspace)
        self.exec_calls: list[tuple[str, list[str], dict[str, str], str]] = []
        self.active_log_streams = 0
        self.closed = False
        self._log_changed = asyncio.Event()
        self._ids = 0

    # -- test helpers
    def state_of(self, workspace: str) -> EnvState:
        env = self.environments.get(workspace)
        return env.state if env is not None else EnvState.ABSENT

    def set_state(self, workspace: str, state: EnvState) -> None:
        """Change an environment behind everyone's back (e.g. it crashed)."""
        self._env(workspace).state = state
        self._log_changed.set()

    def add_log(self, workspace: str, text: str, stream: str = "stdout", service: str = "") -> None:
        self._env(workspace).logs.append(LogRecord(time.time_ns(), stream, text, service))
        self._log_changed.set()

    def _check_broken(self, workspace: str) -> None:
        if workspace in self.broken:
            raise self.broken[workspace]

    def _env(self, workspace: str) -> FakeEnvironment:
        env = self.environments.get(workspace)
        if env is None:
            raise NotFoundError(f"no environment for workspace {workspace!r} (fake {self.name})")
        return env

    def _status(self, workspace: str) -> EnvironmentStatus:
        env = self.environments.get(workspace)
        if env is None:
            return EnvironmentStatus(workspace=workspace, provider=self.name, state=EnvState.ABSENT)
        return EnvironmentStatus(
            workspace=workspace,
            provider=self.name,
            state=env.state,
            id=env.id,
            image=env.spec.image,
            addresses=("10.0.0.2",) if env.state == EnvState.RUNNING else (),
        )

    # -- Provider
    async def readiness(self) -> Readiness:
        return self.readiness_value

    async def _create(self, spec: EnvironmentSpec) -> EnvironmentStatus:
        self.calls.append(("create", spec.workspace))
        if self.fail_create is not None:
            raise self.fail_create
        if spec.workspace in self.environments:
            raise AlreadyExistsError(f"environment {spec.workspace!r} already exists")
        self._ids += 1
        self.environments[spec.workspace] = FakeEnvironment(
            spec=replace(spec), state=EnvState.CREATED, id=f"fake-{self._ids:04d}"
        )
        return self._status(spec.workspace)

    async def _start(self, workspace: str) -> EnvironmentStatus:
        self.calls.append(("start", workspace))
        self._check_broken(workspace)
        if self.fail_start is not None:
            raise self.fail_start
        self._env(workspace).state = EnvState.RUNNING
        return self._status(workspace)

    async def _stop(self, workspace: str, timeout: float) -> EnvironmentStatus:
        self.calls.append(("stop", workspace))
        self._check_broken(workspace)
        if self.fail_stop is not None:
            raise self.fail_stop
        env = self._env(workspace)
        if env.state == EnvState.RUNNING:
            env.state = EnvState.STOPPED
            self._log_changed.set()
        return self._status(workspace)

    async def _destroy(self, workspace: str) -> None:
        self.calls.append(("destroy", workspace))
        self._check_broken(workspace)
        if self.fail_destroy is not None:
            raise self.fail_destroy
        self.environments.pop(workspace, None)
        self._log_changed.set()

    async def _inspect(self, workspace: str) -> EnvironmentStatus:
        self.calls.append(("inspect", workspace))
        self._check_broken(workspace)
        return self._status(workspace)

    async def _list(self) -> list[EnvironmentStatus]:
        return [self._status(ws) for ws in sorted(self.environments)]

    async def _exec(
        self, workspace: str, argv: Sequence[str], env: Mapping[str, str] | None, workdir: str
    ) -> AsyncGenerator[ExecChunk, None]:
        if self._env(workspace).state != EnvState.RUNNING:
            raise NotRunningError(f"fake environment {workspace!r} is not running")
        self.exec_calls.append((workspace, list(argv), dict(env or {}), workdir))
        yield ExecChunk(stdout=" ".join(argv).encode() + b"\n")
        if self.exec_stderr:
            yield ExecChunk(stderr=self.exec_stderr)
        yield ExecChunk(exit_code=self.exec_exit_code)

    async def _logs(
        self, workspace: str, *, follow: bool, tail: int | None, since_unix_nano: int
    ) -> AsyncGenerator[LogRecord, None]:
        records = self._env(workspace).logs
        start = max(len(records) - tail, 0) if tail else 0
        self.active_log_streams += 1
        try:
            i = start
            while True:
                while i < len(records):
                    rec = records[i]
                    i += 1
                    if rec.time_unix_nano >= since_unix_nano:
                        yield rec
                env = self.environments.get(workspace)
                if not follow or env is None or env.state != EnvState.RUNNING:
                    return
                self._log_changed.clear()
                # Also poll: tests may append to the list directly.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._log_changed.wait(), 0.05)
        finally:
            self.active_log_streams -= 1

    async def close(self) -> None:
        self.closed = True


# --------------------------------------------------------------------------- transport


class _Silence(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    """While its transport is ``silent``, unary calls get no answer until their deadline."""

    def __init__(self, transport: FakeTransport) -> None:
        self.transport = transport

    async def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        # As over a dropped link: answered late, or not at all. asyncio.timeout, not
        # wait_for: 3.11's wait_for returns the result when the caller is cancelled just
        # as talking is set, and the lost cancellation left the coordinator's heartbeat
        # loop running at teardown, hanging a clean-clone CI run in test_liveness.
        if not self.transport.talking.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(details.timeout):
                    await self.transport.talking.wait()
        if self.transport.silent:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                details="Deadline Exceeded",
                debug_error_string="",
            )
        return await continuation(details, request)


class FakeTransport(Transport):
    """A channel to an in-process agent's unix socket, with a connection that can drop.

    Knobs: ``drop()`` closes the "connection"; ``unreachable`` makes connects fail;
    ``silent`` makes the node fall silent as behind dropped traffic: the connection
    stays open, unary calls (heartbeats) hang until their deadline, connects time out.
    """

    kind = "fake"

    def __init__(self, socket_path: Path | str, node: str = "") -> None:
        self.socket_path = str(socket_path)
        self.node = node
        self.unreachable = False
        self.talking = asyncio.Event()  # cleared while silent
        self.talking.set()
        self.connects = 0
        self.closes = 0
        self.agent_stops = 0
        self.purges = 0
        self._channel: grpc.aio.Channel | None = None
        self._closed = asyncio.Event()

    def dial_socket(self) -> Path | None:
        """The in-process agent's own dial socket, beside its gRPC socket."""
        path = Path(self.socket_path).with_name(DIAL_SOCKET)
        return path if path.exists() else None

    @property
    def silent(self) -> bool:
        return not self.talking.is_set()

    @silent.setter
    def silent(self, value: bool) -> None:
        if value:
            self.talking.clear()
        else:
            self.talking.set()

    async def connect(self) -> grpc.aio.Channel:
        self.connects += 1
        if self.unreachable:
            raise NodeUnreachableError(f"cannot reach node {self.node!r}: fake network is down")
        if self.silent:
            await asyncio.sleep(0.2)
            raise NodeUnreachableError(f"cannot reach node {self.node!r}: timed out")
        self._closed.clear()
        self._channel = grpc.aio.insecure_channel(
            f"unix:{self.socket_path}",
            options=CHANNEL_OPTIONS,
            interceptors=[cast(Any, _Silence(self))],
        )
        return self._channel

    def drop(self) -> None:
        """The "SSH connection" drops: wait_closed() returns."""
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def stop_agent(self, purge: bool = False) -> None:
        if self.unreachable or self.silent:
            raise NodeUnreachableError(f"cannot reach node {self.node!r}: fake network is down")
        self.agent_stops += 1
        self.purges += purge

    async def forward(self, listen_port: int, dest_host: str, dest_port: int) -> Forward:
        # The real loopback proxy: forwards are plain TCP on one machine.
        return await TcpForward.open(listen_port, dest_host, dest_port)

    async def close(self) -> None:
        self.closes += 1
        self._closed.set()
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close(None)


# --------------------------------------------------------------------------- cluster


@dataclass
class FakeAgent:
    node: str
    provider: FakeProvider
    server: AgentServer


class Cluster:
    """Fake agents (one per node) and a real coordinator reaching them through FakeTransports."""

    def __init__(self, root: Path, nodes: Sequence[str]) -> None:
        if LOCAL_NODE not in nodes:
            raise ValueError(f"the nodes must include {LOCAL_NODE!r}")
        self.root = root
        self.home = root / "home"
        self.node_names = list(nodes)
        self.agents: dict[str, FakeAgent] = {}
        self.transports: dict[str, FakeTransport] = {}
        self._coordinator: Coordinator | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stub: coordinator_pb2_grpc.CoordinatorAsyncStub | None = None

    # -- accessors
    @property
    def coordinator(self) -> Coordinator:
        assert self._coordinator is not None, "the coordinator is not running"
        return self._coordinator

    @property
    def stub(self) -> coordinator_pb2_grpc.CoordinatorAsyncStub:
        assert self._stub is not None, "the coordinator is not running"
        return self._stub

    def provider(self, node: str) -> FakeProvider:
        return self.agents[node].provider

    def transport(self, node: str) -> FakeTransport:
        return self.transports[node]

    def transport_factory(self, record: NodeRecord) -> Transport:
        agent = self.agents.get(record.name)
        if agent is None:  # e.g. a node added by a test without an agent: never reachable
            transport = FakeTransport(self.root / "no-such-agent.sock", record.name)
            transport.unreachable = True
        else:
            transport = FakeTransport(agent.server.socket, record.name)
        self.transports[record.name] = transport
        return transport

    # -- lifetime
    async def start_agent(self, node: str) -> FakeAgent:
        agent_dir = self.root / f"a-{node}"
        provider = FakeProvider(f"agent-{node}")
        server = AgentServer(agent_dir, providers=ProviderSet({"docker": provider}))
        await server.start()
        self.agents[node] = agent = FakeAgent(node, provider, server)
        return agent

    async def start_coordinator(self, *, wait_ready: bool = True) -> Coordinator:
        coordinator = Coordinator(self.home, transport_factory=self.transport_factory)
        self._coordinator = coordinator
        for name in self.node_names:
            if name != LOCAL_NODE and await coordinator.store.get_node(name) is None:
                await coordinator.store.add_node(
                    NodeRecord(name=name, address=f"{name}.test", transport="ssh", user="dev")
                )
        await coordinator.start()
        self._channel = grpc.aio.insecure_channel(f"unix:{coordinator.socket}")
        self._stub = coordinator_pb2_grpc.CoordinatorStub(self._channel)
        if wait_ready:
            await self.wait_nodes_ready()
        return coordinator

    async def wait_nodes_ready(self, names: Sequence[str] | None = None) -> None:
        wanted = list(names or self.node_names)

        def ready() -> bool:
            states = {c.name: c.state for c in self.coordinator.nodes.all()}
            return all(states.get(n) == NodeState.READY for n in wanted)

        await wait_until(ready, f"nodes {wanted} to be READY")

    async def stop_coordinator(self) -> None:
        if self._channel is not None:
            await self._channel.close(None)
            self._channel = None
            self._stub = None
        if self._coordinator is not None:
            coordinator, self._coordinator = self._coordinator, None
            await coordinator.stop(grace=0.2)

    async def restart_coordinator(self) -> Coordinator:
        await self.stop_coordinator()
        return await self.start_coordinator()

    async def stop(self) -> None:
        try:
            await self.stop_coordinator()
        finally:
            for agent in self.agents.values():
                with contextlib.suppress(Exception):
                    await agent.server.stop(grace=0.2)
            self.agents.clear()


@contextlib.asynccontextmanager
async def running_cluster(
    nodes: Sequence[str] = (LOCAL_NODE, "node1"), *, wait_ready: bool = True
) -> AsyncIterator[Cluster]:
    """A fake agent per node name and a coordinator that knows them all ("local" included)."""
    root = short_tmp_dir()
    cluster = Cluster(root, nodes)
    try:
        for name in nodes:
            await cluster.start_agent(name)
        await cluster.start_coordinator(wait_ready=wait_ready)
        yield cluster
    finally:
        try:
            await cluster.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)
