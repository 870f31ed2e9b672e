"""DockerProvider: each environment is one labelled container on the node's Docker engine.

Lifecycle lives here; finding containers and reading their state in
``containers``, execs in ``execs`` and ``terminal``, log and socket streams in
``streams``, image pulls in ``images``, the error seam in ``errors``. Every
docker-py call goes through the provider's ``EngineClient`` (a thread, with
the error seam around it) or a reader thread of ``providers.threaded``.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import functools
import math
import os
import re
import shutil
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import docker
import docker.errors

from common.errors import AlreadyExistsError, InvalidArgumentError, VendettaError
from providers.access import socket_denied
from providers.base import (
    PERMITTED,
    Capabilities,
    EnvironmentSpec,
    EnvironmentStatus,
    EnvState,
    ExecChunk,
    ImageInfo,
    LogRecord,
    Provider,
    Readiness,
    Terminal,
    failed_check,
)
from providers.docker import containers, execs, fifo_pipes, images
from providers.docker.containers import Info
from providers.docker.errors import docker_errors, removal_in_progress, translate
from providers.docker.images import DEFAULT_PULL_STALL_TIMEOUT, ensure_image
from providers.docker.spares import Spares
from providers.docker.streams import THREAD_PREFIX, open_log_records
from providers.docker.terminal import open_session
from providers.threaded import Closer, EngineClient, ThreadedStream

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


def work_user(image_user: str, uid: int, gid: int) -> str:
    """Who works in a container whose workdir is a folder of ``uid``:``gid`` on the node,
    when the spec names nobody ("": the image's user).

    A bind mount maps no ids: inside, the files are ``uid``'s. If the image would have
    root work there, the folder's owner works there instead, so that what is made in
    it stays theirs on the node (root's files there could not be changed or removed by
    the node user, nor by the agent running as them). An image with a user of its own
    keeps it; ``user: root`` in the config asks for root.
    """
    if uid == 0 or image_user not in ("", "root", "0", "0:0", "root:root"):
        return ""
    return f"{uid}:{gid}"


class DockerProvider(Provider):
    """Environments as containers on the local Docker engine, driven with docker-py 7."""

    name: ClassVar[str] = "docker"
    capabilities: ClassVar[Capabilities] = Capabilities(
        long_exec_streams=True, terminal=True, stdin=True
    )
    import_needs_name: ClassVar[bool] = False
    image_formats: ClassVar[str] = (
        "one `docker save` archive (a tar, optionally compressed); --name tags its one image"
    )

    def __init__(
        self,
        agent_id: str,
        base_url: str | None = None,
        *,
        pull_stall_timeout: float = DEFAULT_PULL_STALL_TIMEOUT,
        io_root: Path | None = None,
    ) -> None:
        """``base_url`` None: what ``docker.from_env()`` finds (DOCKER_HOST or the default socket).
        ``io_root``: where each container's FIFO folder is made (fifo_pipes), for an
        engine on this machine; None: commands on pipes use the exec stream.

        Nothing connects here: the client is made on first use, in a thread.
        """
        super().__init__(agent_id)
        self._base_url = base_url
        self.where = base_url or os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST
        # An engine elsewhere would mount a folder of its own machine, not this one's.
        self._io_root = io_root if self.where.startswith("unix://") else None
        self._pull_stall_timeout = pull_stall_timeout
        # docker-py's low-level APIClient: every call below is made with it.
        self._engine: EngineClient[Any] = EngineClient(
            self._connect,
            functools.partial(docker_errors, self.where),
            close=lambda api: api.close(),
        )
        self._spares = Spares(self._engine)

    # -- plumbing --------------------------------------------------------------

    def _connect(self) -> Any:
        # Both constructors ask the daemon for its API version: they block.
        if self._base_url is None:
            return docker.from_env().api
        return docker.DockerClient(base_url=self._base_url).api

    def _translate(self, action: str) -> Callable[[Exception], Exception]:
        """The error seam for what a reader thread raises while ``action``."""
        return functools.partial(translate, where=self.where, action=action)

    def container_name(self, workspace: str) -> str:
        suffix = _UNSAFE_NAME_CHARS.sub("-", self.agent_id[:8])
        return f"vendetta-{workspace}-{suffix}"

    async def _find(self, workspace: str) -> Info | None:
        return await self._engine.call(
            f"looking up workspace {workspace!r}",
            lambda api: containers.find(api, self.agent_id, workspace),
        )

    async def _require(self, workspace: str) -> Info:
        info = await self._find(workspace)
        if info is None:
            raise self.missing(workspace)
        return info

    async def _require_running(self, workspace: str) -> str:
        """The id of the workspace's container, which must be running."""
        return containers.container_id(await self._running_info(workspace))

    async def _running_info(self, workspace: str) -> Info:
        info = await self._require(workspace)
        if containers.docker_status(info) != "running":
            raise self.not_running(workspace)
        return info

    # -- readiness -------------------------------------------------------------

    async def readiness(self) -> Readiness:
        def probe(api: Any) -> tuple[dict[str, Any], builtins.list[str]]:
            api.ping()
            version: dict[str, Any] = api.version()
            tags: set[str] = set()
            for image in api.images():
                tags.update(t for t in image.get("RepoTags") or () if t != "<none>:<none>")
            return version, sorted(tags)

        if denied := await asyncio.to_thread(socket_denied, self.where, "docker"):
            return Readiness(
                ready=False, detail=f"Docker daemon at {self.where}: {denied}", failed=PERMITTED
            )
        try:
            version, tags = await self._engine.call("checking the Docker engine", probe)
        except VendettaError as exc:
            return Readiness(ready=False, detail=exc.message, failed=failed_check(exc))
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

    # -- images ----------------------------------------------------------------

    async def _images(self) -> builtins.list[ImageInfo]:
        return await self._engine.call("listing images", images.image_infos)

    async def _import_image(self, name: str, files: Mapping[str, Path]) -> builtins.list[ImageInfo]:
        if len(files) != 1:
            raise InvalidArgumentError(
                f"Docker imports one `docker save` archive at a time, not {len(files)} files"
            )
        [(file_name, path)] = files.items()
        await asyncio.to_thread(images.check_save_file, file_name, path)
        loaded = await self._engine.call(
            f"loading {file_name}", lambda api: images.load(api, path, name)
        )
        return [i for i in await self._images() if i.name in loaded or i.id in loaded]

    # -- lifecycle -------------------------------------------------------------

    async def _create(self, spec: EnvironmentSpec) -> EnvironmentStatus:
        workspace = spec.workspace
        await self._engine.call(
            f"preparing image {spec.image!r}",
            lambda api: ensure_image(api, spec.image, stall_timeout=self._pull_stall_timeout),
        )

        name = self.container_name(workspace)
        command = list(spec.command) if spec.command is not None else list(IDLE_COMMAND)

        # The source: the node's folder itself, bind-mounted; commands start there and
        # run as the spec's user (else see work_user), which Docker keeps per container.
        workdir = spec.source_workdir
        binds: dict[str, dict[str, str]] = {}
        if workdir:
            binds[spec.source_path] = {"bind": workdir, "mode": "rw"}
            if spec.git_dir:  # where a worktree's .git file points
                binds[spec.git_dir] = {"bind": spec.git_dir, "mode": "rw"}
        if self._io_root is not None:
            folder = await asyncio.to_thread(fifo_pipes.make_io_folder, self._io_root, name)
            binds[str(folder)] = {"bind": fifo_pipes.IO_MOUNT, "mode": "rw"}
        user = spec.user
        if workdir and not user:
            owner = await asyncio.to_thread(os.stat, spec.source_path)
            image_user = await self._engine.call(
                f"inspecting image {spec.image!r}",
                lambda api: str(
                    (api.inspect_image(spec.image).get("Config") or {}).get("User") or ""
                ),
            )
            user = work_user(image_user, owner.st_uid, owner.st_gid)

        def create_container(api: Any) -> None:
            host_config = api.create_host_config(
                nano_cpus=round(spec.cpus * 1e9) if spec.cpus is not None else None,
                mem_limit=spec.memory_bytes,
                # Loopback only, on a free port Docker picks: the coordinator forwards to it.
                port_bindings={p: ("127.0.0.1", None) for p in spec.ports},
                binds=binds or None,
            )
            api.create_container(
                ports=list(spec.ports),
                image=spec.image,
                command=command,
                name=name,
                hostname=workspace,
                labels=containers.labels(self.agent_id, workspace, workdir, spec.owner),
                working_dir=workdir or None,
                user=user or None,
                environment=dict(spec.env),
                host_config=host_config,
                detach=True,
                tty=False,
                stdin_open=False,
            )

        try:
            await self._engine.call(f"creating container {name!r}", create_container)
        except AlreadyExistsError as exc:
            # Taken, but not by a container with our labels (or we lost a race).
            raise self.name_taken(workspace, name, exc, f"docker rm -f {name}") from exc
        return await self._inspect(workspace)

    async def _start(self, workspace: str) -> EnvironmentStatus:
        info = await self._require(workspace)
        container_id = containers.container_id(info)
        status = containers.docker_status(info)
        if status == "paused":
            await self._engine.call(
                f"unpausing {workspace!r}", lambda api: api.unpause(container_id)
            )
        elif status != "running":
            await self._engine.call(f"starting {workspace!r}", lambda api: api.start(container_id))
        return await self._inspect(workspace)

    async def _stop(self, workspace: str, timeout: float) -> EnvironmentStatus:
        await self._spares.drop(workspace)
        info = await self._require(workspace)
        container_id = containers.container_id(info)
        if containers.docker_status(info) in containers.ACTIVE_STATES:
            # SIGTERM, then SIGKILL after `seconds`; docker-py widens its HTTP timeout to match.
            seconds = max(0, math.ceil(timeout))
            await self._engine.call(
                f"stopping {workspace!r}", lambda api: api.stop(container_id, timeout=seconds)
            )
        return await self._inspect(workspace)

    async def _destroy(self, workspace: str) -> None:
        await self._spares.drop(workspace)

        def remove_all(api: Any) -> None:
            for container_id in containers.container_ids(api, self.agent_id, workspace):
                try:
                    api.remove_container(container_id, force=True, v=True)
                except docker.errors.NotFound:
                    pass  # already gone: that is what we want
                except docker.errors.APIError as exc:
                    if not removal_in_progress(exc):  # else someone else is removing it
                        raise

        await self._engine.call(f"removing workspace {workspace!r}", remove_all)
        if self._io_root is not None:
            folder = self._io_root / self.container_name(workspace)
            await asyncio.to_thread(shutil.rmtree, folder, ignore_errors=True)

    async def _inspect(self, workspace: str) -> EnvironmentStatus:
        info = await self._find(workspace)
        if info is None:
            return EnvironmentStatus(workspace=workspace, provider=self.name, state=EnvState.ABSENT)
        return containers.status_of(self.name, workspace, info)

    async def _list(self) -> builtins.list[EnvironmentStatus]:
        infos = await self._engine.call(
            "listing environments", lambda api: containers.inspect_all(api, self.agent_id)
        )
        statuses: dict[str, EnvironmentStatus] = {}
        for info in infos:  # newest first: keep the newest per workspace
            workspace = containers.workspace_of(info)
            if workspace and workspace not in statuses:
                statuses[workspace] = containers.status_of(self.name, workspace, info)
        return builtins.list(statuses.values())

    async def close(self) -> None:
        await self._spares.close()
        await self._engine.close()

    # -- commands --------------------------------------------------------------

    async def _exec(
        self, workspace: str, argv: Sequence[str], env: Mapping[str, str] | None, workdir: str
    ) -> AsyncGenerator[ExecChunk, None]:
        """Run argv in the running container: its output as it comes, then its exit code.

        Closing the generator closes the exec's connection, which ends the reader
        thread; Docker has no API to kill an exec'd process, so the command itself
        may run on inside the container.
        """
        container_id = await self._require_running(workspace)
        action = f"running {argv[0]!r} in {workspace!r}"
        # A container stopped since the look-up: NotRunningError, from the error seam.
        exec_id = await self._engine.call(
            action, lambda api: execs.create_exec(api, container_id, argv, env, workdir=workdir)
        )
        api = await self._engine.client()
        output = execs.chunks(
            self._engine,
            exec_id,
            lambda: execs.open_frames(api, exec_id),
            thread_name=f"{THREAD_PREFIX}exec-{workspace}",
            action=action,
            on_error=self._translate(action),
        )
        async with contextlib.aclosing(output):
            async for chunk in output:
                yield chunk

    async def _attach(
        self,
        workspace: str,
        argv: Sequence[str],
        *,
        rows: int,
        cols: int,
        env: Mapping[str, str] | None,
    ) -> Terminal:
        """An exec with a TTY and stdin, on a raw socket (resizable)."""
        container_id = await self._require_running(workspace)
        action = f"opening a terminal in {workspace!r}"
        return await self._session(container_id, workspace, argv, env, (rows, cols), action)

    async def _pipe(
        self, workspace: str, argv: Sequence[str], env: Mapping[str, str] | None
    ) -> Terminal:
        """On FIFOs where the container has its IO folder (fifo_pipes); else an exec
        with stdin and no TTY, whose output frames keep stdout and stderr apart
        (closing stdin half-closes the socket, which Docker passes on as end-of-file)."""
        action = f"running {argv[0]!r} in {workspace!r}"
        info = await self._running_info(workspace)
        container_id = containers.container_id(info)
        folder = fifo_pipes.io_folder(info)
        if folder is not None:
            opened = await self._spares.take(workspace, container_id, argv, env)
            if opened is None:
                opened = await fifo_pipes.open_fifo_pipe(
                    self._engine, container_id, folder, argv, env, action=action
                )
            if opened is not None:
                opened.on_closed = functools.partial(
                    self._spares.refill, workspace, container_id, folder, action
                )
                return opened
        return await self._session(container_id, workspace, argv, env, None, action)

    async def _session(
        self,
        container_id: str,
        workspace: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None,
        size: tuple[int, int] | None,
        action: str,
    ) -> Terminal:
        return await open_session(
            self._engine,
            container_id,
            argv,
            env,
            name=workspace,
            size=size,
            action=action,
            on_error=self._translate(action),
        )

    # -- logs ------------------------------------------------------------------

    async def _logs(
        self, workspace: str, *, follow: bool, tail: int | None, since_unix_nano: int
    ) -> AsyncGenerator[LogRecord, None]:
        batches = self._log_batches(
            workspace, follow=follow, tail=tail, since_unix_nano=since_unix_nano
        )
        async with contextlib.aclosing(batches):
            async for batch in batches:
                for record in batch:
                    yield record

    async def _log_batches(
        self, workspace: str, *, follow: bool, tail: int | None, since_unix_nano: int
    ) -> AsyncGenerator[builtins.list[LogRecord], None]:
        """The container's stdout/stderr as records, in Docker's order, in the batches
        one read brought.

        With ``follow`` it ends when the container stops (or the caller cancels,
        which closes the HTTP stream and so ends the reader thread); if the
        stream ends because the engine went away, that is raised, not hidden.
        """
        container_id = containers.container_id(await self._require(workspace))
        action = f"reading logs of {workspace!r}"
        api = await self._engine.client()

        def open_logs() -> tuple[Iterable[builtins.list[LogRecord]], Closer]:
            return open_log_records(
                api, container_id, follow=follow, tail=tail, since_unix_nano=since_unix_nano
            )

        stream: ThreadedStream[builtins.list[LogRecord]] = ThreadedStream(
            f"{THREAD_PREFIX}logs-{workspace}", open_logs, self._translate(action)
        )
        try:
            async for batch in stream:
                yield batch
        finally:
            await stream.aclose()
        if follow:
            # A followed stream also ends when dockerd dies: raise that, don't end quietly.
            await self._engine.call(action, lambda api: api.ping())
