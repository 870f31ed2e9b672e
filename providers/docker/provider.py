"""DockerProvider: each environment is one labelled container on the node's Docker engine.

Lifecycle lives here; log and exec streaming helpers in ``streams``, image
pulls in ``images``, the error seam in ``errors``. Every docker-py call runs in
a thread (``asyncio.to_thread``, or a dedicated reader thread for streams).

Containers are found only by their labels (managed + agent + workspace), never
by name, so an agent finds its own after a restart and two agents sharing one
dockerd never see each other's.
"""

from __future__ import annotations

import asyncio
import builtins
import math
import os
import re
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import docker
import docker.errors

from common.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    VendettaError,
)
from common.names import validate_name
from providers.base import (
    LABEL_AGENT,
    LABEL_MANAGED,
    LABEL_WORKSPACE,
    Capabilities,
    EnvironmentSpec,
    EnvironmentStatus,
    EnvState,
    ExecChunk,
    LogRecord,
    Provider,
    Readiness,
    Terminal,
    check_env,
)
from providers.docker.errors import docker_errors, translate
from providers.docker.images import DEFAULT_PULL_STALL_TIMEOUT, ensure_image
from providers.docker.streams import (
    STDERR,
    THREAD_PREFIX,
    exec_frames,
    open_log_records,
    shutdown_socket,
)
from providers.docker.terminal import DockerTerminal
from providers.threaded import Closer, ThreadedStream

T = TypeVar("T")

DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"

# Keeps an environment without a command alive with nothing but /bin/sh, and
# exits at once on `docker stop` (a shell as PID 1 ignores SIGTERM otherwise).
IDLE_COMMAND: tuple[str, ...] = (
    "/bin/sh",
    "-c",
    "trap 'exit 0' TERM INT; while :; do sleep 1 & wait $!; done",
)

MAX_IMAGES = 20

_UNSAFE_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_.-]")

# Docker container states that have a process to stop.
_ACTIVE_STATES = frozenset({"running", "paused", "restarting"})


def _state_of(docker_status: str) -> EnvState:
    if docker_status == "running":
        return EnvState.RUNNING
    if docker_status == "created":
        return EnvState.CREATED
    if not docker_status:
        return EnvState.UNKNOWN
    return EnvState.STOPPED  # exited, dead, paused, restarting, removing


def _addresses(info: Mapping[str, Any]) -> tuple[str, ...]:
    networks = (info.get("NetworkSettings") or {}).get("Networks") or {}
    found: builtins.list[str] = []
    for network in networks.values():
        for key in ("IPAddress", "GlobalIPv6Address"):
            address = (network or {}).get(key)
            if address and address not in found:
                found.append(str(address))
    return tuple(found)


def _ports(info: Mapping[str, Any]) -> dict[int, str]:
    bound = (info.get("NetworkSettings") or {}).get("Ports") or {}
    found: dict[int, str] = {}
    for key, bindings in bound.items():
        port, _, proto = str(key).partition("/")
        for b in bindings or ():
            if proto == "tcp" and b.get("HostPort"):
                found[int(port)] = f"{b.get('HostIp') or '127.0.0.1'}:{b['HostPort']}"
                break
    return found


def _detail(state: Mapping[str, Any]) -> str:
    status = str(state.get("Status") or "unknown")
    parts = [f"docker status {status}"]
    if status in ("exited", "dead"):
        parts.append(f"exit code {state.get('ExitCode')}")
    if state.get("OOMKilled"):
        parts.append("killed: out of memory")
    if state.get("Error"):
        parts.append(f"error: {state['Error']}")
    return ", ".join(parts)


class DockerProvider(Provider):
    """Environments as containers on the local Docker engine, driven with docker-py 7."""

    name: ClassVar[str] = "docker"
    capabilities: ClassVar[Capabilities] = Capabilities(
        exec=True,
        follow_logs=True,
        resource_limits=True,
        virtual_machine=False,
        terminal=True,
        stdin=True,
    )

    def __init__(
        self,
        agent_id: str,
        base_url: str | None = None,
        *,
        pull_stall_timeout: float = DEFAULT_PULL_STALL_TIMEOUT,
    ) -> None:
        """``base_url`` None: what ``docker.from_env()`` finds (DOCKER_HOST or the default socket).

        Nothing connects here: the client is made on first use, in a thread.
        """
        if not agent_id:
            raise InvalidArgumentError("agent id must not be empty")
        super().__init__(agent_id)
        self._base_url = base_url
        self.where = base_url or os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST
        self._pull_stall_timeout = pull_stall_timeout
        self._client: Any = None
        self._client_lock = asyncio.Lock()

    # -- plumbing --------------------------------------------------------------

    def _connect(self) -> Any:
        # Both constructors ask the daemon for its API version: they block.
        if self._base_url is None:
            return docker.from_env()
        return docker.DockerClient(base_url=self._base_url)

    async def _api(self) -> Any:
        """docker-py's low-level APIClient, made on first use (failures are not cached)."""
        client = self._client
        if client is None:
            async with self._client_lock:
                client = self._client
                if client is None:
                    with docker_errors(self.where, "connecting to Docker"):
                        client = await asyncio.to_thread(self._connect)
                    self._client = client
        return client.api

    async def _run(self, action: str, fn: Callable[[Any], T]) -> T:
        """Run ``fn(api)`` in a thread; its docker-py errors come out as common.errors."""
        api = await self._api()
        with docker_errors(self.where, action):
            return await asyncio.to_thread(fn, api)

    def container_name(self, workspace: str) -> str:
        suffix = _UNSAFE_NAME_CHARS.sub("-", self.agent_id[:8])
        return f"vendetta-{workspace}-{suffix}"

    def _labels(self, workspace: str) -> dict[str, str]:
        return {LABEL_MANAGED: "true", LABEL_AGENT: self.agent_id, LABEL_WORKSPACE: workspace}

    def _filters(self, workspace: str | None = None) -> dict[str, builtins.list[str]]:
        labels = [f"{LABEL_MANAGED}=true", f"{LABEL_AGENT}={self.agent_id}"]
        if workspace is not None:
            labels.append(f"{LABEL_WORKSPACE}={workspace}")
        return {"label": labels}

    def _container_ids(self, api: Any, workspace: str | None) -> builtins.list[str]:
        """Ids of this agent's containers (for one workspace), newest first. Blocking."""
        summaries = api.containers(all=True, filters=self._filters(workspace))
        summaries.sort(key=lambda s: s.get("Created", 0), reverse=True)
        return [str(s["Id"]) for s in summaries]

    def _find_sync(self, api: Any, workspace: str) -> dict[str, Any] | None:
        """``docker inspect`` of the workspace's container, or None. Blocking."""
        for _ in range(3):  # a container may vanish between list and inspect
            ids = self._container_ids(api, workspace)
            if not ids:
                return None
            try:
                info: dict[str, Any] = api.inspect_container(ids[0])
            except docker.errors.NotFound:
                continue
            return info
        return None

    async def _find(self, workspace: str) -> dict[str, Any] | None:
        return await self._run(
            f"looking up workspace {workspace!r}", lambda api: self._find_sync(api, workspace)
        )

    async def _require(self, workspace: str) -> dict[str, Any]:
        info = await self._find(workspace)
        if info is None:
            raise self.missing(workspace)
        return info

    def _status(self, workspace: str, info: Mapping[str, Any]) -> EnvironmentStatus:
        state = info.get("State") or {}
        return EnvironmentStatus(
            workspace=workspace,
            provider=self.name,
            state=_state_of(str(state.get("Status") or "")),
            id=str(info.get("Id", "")),
            image=str((info.get("Config") or {}).get("Image") or info.get("Image") or ""),
            addresses=_addresses(info),
            detail=_detail(state),
            ports=_ports(info),
        )

    @staticmethod
    def _not_running(workspace: str) -> str:
        return f"workspace {workspace} is not running: run `vendetta workspace up {workspace}`"

    # -- readiness -------------------------------------------------------------

    async def readiness(self) -> Readiness:
        def probe(api: Any) -> tuple[dict[str, Any], builtins.list[str]]:
            api.ping()
            version: dict[str, Any] = api.version()
            tags: set[str] = set()
            for image in api.images():
                tags.update(t for t in image.get("RepoTags") or () if t != "<none>:<none>")
            return version, sorted(tags)

        try:
            version, tags = await self._run("checking the Docker engine", probe)
        except VendettaError as exc:
            return Readiness(ready=False, detail=exc.message)
        engine = str(version.get("Version", "?"))
        return Readiness(
            ready=True,
            detail=(
                f"Docker Engine {engine} (API {version.get('ApiVersion', '?')}, "
                f"{version.get('Os', '?')}/{version.get('Arch', '?')}) at {self.where}"
            ),
            version=engine,
            images=tuple(tags[:MAX_IMAGES]),
        )

    # -- lifecycle -------------------------------------------------------------

    async def create(self, spec: EnvironmentSpec) -> EnvironmentStatus:
        workspace = validate_name("workspace", spec.workspace)
        if not spec.image:
            raise InvalidArgumentError(
                f"workspace {workspace!r} has no image: set docker.image in .vendetta/config.yaml"
            )
        if spec.cpus is not None and spec.cpus <= 0:
            raise InvalidArgumentError(f"cpus must be positive, got {spec.cpus}")
        if spec.memory_bytes is not None and spec.memory_bytes <= 0:
            raise InvalidArgumentError(f"memory must be positive, got {spec.memory_bytes} bytes")
        if spec.command is not None and not spec.command:
            raise InvalidArgumentError("command must not be empty (leave it unset to idle)")
        check_env(spec.env)

        existing = await self._find(workspace)
        if existing is not None:
            raise AlreadyExistsError(
                f"workspace {workspace!r} already has a Docker environment on this node "
                f"({self._status(workspace, existing).detail}): start it with "
                f"`vendetta workspace up {workspace}` or remove it with "
                f"`vendetta workspace destroy {workspace}`"
            )
        await self._run(
            f"preparing image {spec.image!r}",
            lambda api: ensure_image(api, spec.image, stall_timeout=self._pull_stall_timeout),
        )

        name = self.container_name(workspace)
        command = list(spec.command) if spec.command is not None else list(IDLE_COMMAND)

        def create_container(api: Any) -> str:
            host_config = api.create_host_config(
                nano_cpus=round(spec.cpus * 1e9) if spec.cpus is not None else None,
                mem_limit=spec.memory_bytes,
                # Loopback only, on a free port Docker picks: the coordinator forwards to it.
                port_bindings={p: ("127.0.0.1", None) for p in spec.ports},
            )
            created = api.create_container(
                ports=list(spec.ports),
                image=spec.image,
                command=command,
                name=name,
                hostname=workspace,
                labels=self._labels(workspace),
                environment=dict(spec.env),
                host_config=host_config,
                detach=True,
                tty=False,
                stdin_open=False,
            )
            return str(created["Id"])

        try:
            await self._run(f"creating container {name!r}", create_container)
        except AlreadyExistsError as exc:
            # The name is taken, but not by a container with our labels (or we raced
            # with another create): say which, and what to do.
            raise AlreadyExistsError(
                f"cannot create workspace {workspace!r}: the container name {name!r} is "
                f"already taken on this Docker engine ({exc}); if it is a leftover, "
                f"remove it with `docker rm -f {name}`"
            ) from exc
        return await self.inspect(workspace)

    async def start(self, workspace: str) -> EnvironmentStatus:
        validate_name("workspace", workspace)
        info = await self._require(workspace)
        container_id = str(info["Id"])
        status = (info.get("State") or {}).get("Status")
        if status == "paused":
            await self._run(f"unpausing {workspace!r}", lambda api: api.unpause(container_id))
        elif status != "running":
            await self._run(f"starting {workspace!r}", lambda api: api.start(container_id))
        return await self.inspect(workspace)

    async def stop(self, workspace: str, timeout: float = 10.0) -> EnvironmentStatus:
        validate_name("workspace", workspace)
        info = await self._require(workspace)
        container_id = str(info["Id"])
        if (info.get("State") or {}).get("Status") in _ACTIVE_STATES:
            # SIGTERM, then SIGKILL after `seconds`; docker-py widens its HTTP timeout to match.
            seconds = max(0, math.ceil(timeout))
            await self._run(
                f"stopping {workspace!r}", lambda api: api.stop(container_id, timeout=seconds)
            )
        return await self.inspect(workspace)

    async def destroy(self, workspace: str) -> None:
        validate_name("workspace", workspace)

        def remove_all(api: Any) -> None:
            for container_id in self._container_ids(api, workspace):
                try:
                    api.remove_container(container_id, force=True, v=True)
                except docker.errors.NotFound:
                    pass  # already gone: that is what we want
                except docker.errors.APIError as exc:
                    if exc.status_code == 409 and "in progress" in str(exc.explanation):
                        continue  # someone else is removing it
                    raise

        await self._run(f"removing workspace {workspace!r}", remove_all)

    async def inspect(self, workspace: str) -> EnvironmentStatus:
        validate_name("workspace", workspace)
        info = await self._find(workspace)
        if info is None:
            return EnvironmentStatus(workspace=workspace, provider=self.name, state=EnvState.ABSENT)
        return self._status(workspace, info)

    async def list(self) -> builtins.list[EnvironmentStatus]:
        def inspect_all(api: Any) -> builtins.list[dict[str, Any]]:
            infos = []
            for container_id in self._container_ids(api, None):
                try:
                    infos.append(api.inspect_container(container_id))
                except docker.errors.NotFound:
                    continue
            return infos

        infos = await self._run("listing environments", inspect_all)
        statuses: dict[str, EnvironmentStatus] = {}
        for info in infos:  # newest first: keep the newest per workspace
            labels = (info.get("Config") or {}).get("Labels") or {}
            workspace = str(labels.get(LABEL_WORKSPACE, ""))
            if workspace and workspace not in statuses:
                statuses[workspace] = self._status(workspace, info)
        return [statuses[w] for w in sorted(statuses)]

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await asyncio.to_thread(client.close)

    # -- exec ------------------------------------------------------------------

    async def exec(
        self,
        workspace: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        workdir: str = "",
    ) -> AsyncGenerator[ExecChunk, None]:
        """Run argv (no shell) in the running environment; output chunks, then the exit code.

        Cancelling (or closing the generator) closes the exec's connection, which
        ends the reader thread; Docker has no API to kill an exec'd process, so
        the command itself may run on inside the container.
        """
        validate_name("workspace", workspace)
        if not argv:
            raise InvalidArgumentError("exec needs a command: argv is empty")
        check_env(env or {})
        info = await self._require(workspace)
        if (info.get("State") or {}).get("Status") != "running":
            raise FailedPreconditionError(self._not_running(workspace))
        container_id = str(info["Id"])
        action = f"running {argv[0]!r} in {workspace!r}"

        def as_exec_error(exc: Exception) -> Exception:
            error = translate(exc, where=self.where, action=action)
            if isinstance(error, FailedPreconditionError) and "not running" in str(error):
                return FailedPreconditionError(self._not_running(workspace))
            return error

        try:
            exec_id: str = await self._run(
                action,
                lambda api: api.exec_create(
                    container_id,
                    list(argv),
                    stdout=True,
                    stderr=True,
                    stdin=False,
                    tty=False,
                    environment=dict(env) if env else None,
                    workdir=workdir or None,
                )["Id"],
            )
        except FailedPreconditionError as exc:
            if "not running" in str(exc):  # stopped since we looked
                raise FailedPreconditionError(self._not_running(workspace)) from exc
            raise
        api = await self._api()

        def open_exec() -> tuple[Iterable[tuple[int, bytes]], Closer]:
            sock = api.exec_start(exec_id, socket=True)
            return exec_frames(sock), lambda: shutdown_socket(sock)

        stream: ThreadedStream[tuple[int, bytes]] = ThreadedStream(
            f"{THREAD_PREFIX}exec-{workspace}", open_exec, as_exec_error
        )
        try:
            async for stream_id, data in stream:
                if stream_id == STDERR:
                    yield ExecChunk(stderr=data)
                else:
                    yield ExecChunk(stdout=data)
        finally:
            await stream.aclose()

        # The output ends just before Docker records the exit code: poll briefly.
        delay = 0.005
        while True:
            result: dict[str, Any] = await self._run(action, lambda api: api.exec_inspect(exec_id))
            if not result.get("Running"):
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
        exit_code = result.get("ExitCode")
        yield ExecChunk(exit_code=int(exit_code) if exit_code is not None else -1)

    async def attach(
        self,
        workspace: str,
        argv: Sequence[str],
        *,
        rows: int,
        cols: int,
        env: Mapping[str, str] | None = None,
    ) -> Terminal:
        """An exec with a TTY and stdin, on a raw socket (resizable)."""
        terminal = await self._open_exec(workspace, argv, env, tty=True)
        await terminal.resize(rows, cols)
        terminal.settle_size()
        return terminal

    async def pipe(
        self, workspace: str, argv: Sequence[str], env: Mapping[str, str] | None = None
    ) -> Terminal:
        """An exec with stdin and no TTY: output frames keep stdout and stderr apart;
        closing stdin half-closes the socket, which Docker passes on as end-of-file."""
        return await self._open_exec(workspace, argv, env, tty=False)

    async def _open_exec(
        self, workspace: str, argv: Sequence[str], env: Mapping[str, str] | None, *, tty: bool
    ) -> DockerTerminal:
        check_env(env or {})
        info = await self._require(workspace)
        if (info.get("State") or {}).get("Status") != "running":
            raise FailedPreconditionError(self._not_running(workspace))
        container_id = str(info["Id"])
        action = f"opening a terminal in {workspace!r}" if tty else f"running {argv[0]!r}"
        exec_id: str = await self._run(
            action,
            lambda api: api.exec_create(
                container_id,
                list(argv),
                stdin=True,
                stdout=True,
                stderr=True,
                tty=tty,
                environment=dict(env) if env else None,
            )["Id"],
        )
        sock = await self._run(action, lambda api: api.exec_start(exec_id, socket=True, tty=tty))
        return DockerTerminal(await self._api(), exec_id, sock, workspace, tty=tty)

    # -- logs ------------------------------------------------------------------

    async def logs(
        self, workspace: str, *, follow: bool, tail: int | None, since_unix_nano: int = 0
    ) -> AsyncGenerator[LogRecord, None]:
        """The container's stdout/stderr as records, in Docker's order.

        With ``follow`` it ends when the container stops (or the caller cancels,
        which closes the HTTP stream and so ends the reader thread); if the
        stream ends because the engine went away, that is raised, not hidden.
        """
        validate_name("workspace", workspace)
        if tail is not None and tail < 0:
            raise InvalidArgumentError(f"tail must be 0 or more, got {tail}")
        if since_unix_nano < 0:
            raise InvalidArgumentError(f"since must be 0 or more, got {since_unix_nano}")
        info = await self._require(workspace)
        container_id = str(info["Id"])
        action = f"reading logs of {workspace!r}"
        api = await self._api()

        def open_logs() -> tuple[Iterable[builtins.list[LogRecord]], Closer]:
            return open_log_records(
                api, container_id, follow=follow, tail=tail, since_unix_nano=since_unix_nano
            )

        stream: ThreadedStream[builtins.list[LogRecord]] = ThreadedStream(
            f"{THREAD_PREFIX}logs-{workspace}",
            open_logs,
            lambda exc: translate(exc, where=self.where, action=action),
        )
        try:
            async for batch in stream:
                for record in batch:
                    yield record
        finally:
            await stream.aclose()
        if follow:
            # A followed stream also ends when dockerd dies: raise that, don't end quietly.
            await self._run(action, lambda api: api.ping())
