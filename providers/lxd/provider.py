"""LxdProvider: each environment is one LXD system container on the node's LXD daemon.

Lifecycle lives here, on the contract of ``providers.base.Provider`` (which
checks arguments and words the common errors); finding instances, their
status and state changes in ``instances``, the daemon's readiness and images
in ``daemon``, commands (exec, run, pipe, terminal) in ``sessions`` (on
``execs``, ``terminal`` and the small websocket client of ``websocket``),
the supervised command and its log format in ``command``, log reading in
``logs``, published ports (proxy devices) in ``ports``, the error seam in
``errors``. Every pylxd call goes through the provider's ``EngineClient`` (a
thread, with the error seam around it) or a thread of its own for a command's
output.

Containers are found only by their config keys (``user.vendetta.managed``,
``user.vendetta.agent``, ``user.vendetta.workspace``), never by name alone,
so an agent finds its own after a restart and two agents sharing one LXD
daemon never see each other's.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import logging
import math
import os
from collections.abc import AsyncGenerator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pylxd

from common.errors import AlreadyExistsError, FailedPreconditionError, NotFoundError, VendettaError
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
from providers.lxd import daemon, execs, images, instances, ports, source
from providers.lxd.command import launch_argv
from providers.lxd.errors import lxd_errors
from providers.lxd.instances import KEY_AGENT, KEY_COMMAND, KEY_MANAGED, KEY_WORKSPACE
from providers.lxd.logs import LogReader
from providers.lxd.sessions import Sessions
from providers.threaded import EngineClient

__all__ = ["KEY_AGENT", "KEY_COMMAND", "KEY_MANAGED", "KEY_WORKSPACE", "LxdProvider"]


def _not_pool_full(record: logging.LogRecord) -> bool:
    # pylxd's unix-socket pool keeps one connection; concurrent calls open more, and
    # urllib3 warns each time it drops one. That is expected here, not news for the log.
    return not record.getMessage().startswith("Connection pool is full")


logging.getLogger("urllib3.connectionpool").addFilter(_not_pool_full)

DEFAULT_LXD_SOCKET = "/var/lib/lxd/unix.socket"


def _close_client(client: Any) -> None:
    session = getattr(getattr(client, "api", None), "session", None)
    if session is not None:
        session.close()


class LxdProvider(Provider):
    """Environments as system containers on the local LXD daemon, driven with pylxd 2.4."""

    name: ClassVar[str] = "lxd"
    capabilities: ClassVar[Capabilities] = Capabilities(
        # Services are detached and polled: streamed execs of LXD 5.0 lose output at
        # their end (see execs.DRAIN_WRAPPER), and each holds four sockets and a thread.
        long_exec_streams=False,
        # attach() and pipe() open their own websockets (providers.lxd.websocket).
        terminal=True,
        stdin=True,
    )
    image_formats: ClassVar[str] = images.FORMATS

    def __init__(self, agent_id: str, endpoint: str | None = None) -> None:
        """``endpoint`` None: LXD's local unix socket (``$LXD_DIR`` or /var/lib/lxd).

        Nothing connects here: the client is made on first use, in a thread.
        """
        super().__init__(agent_id)
        self._endpoint = endpoint
        lxd_dir = os.environ.get("LXD_DIR")
        socket = os.path.join(lxd_dir, "unix.socket") if lxd_dir else DEFAULT_LXD_SOCKET
        self.where = endpoint or f"unix://{socket}"
        self._socket = None if endpoint else socket
        self._engine: EngineClient[Any] = EngineClient(
            self._connect,
            lambda action: lxd_errors(self.where, action),
            close=_close_client,
        )
        self._sessions = Sessions(self._engine, self.where, self.not_running)

    def _connect(self) -> Any:
        # pylxd asks the daemon for /1.0 here: it blocks.
        return pylxd.Client(endpoint=self._endpoint)

    def instance_name(self, workspace: str) -> str:
        """``vd-{workspace}-{agent_id[:8]}``, shortened (with a hash) to fit 63 characters."""
        return instances.instance_name(workspace, self.agent_id)

    async def _find(self, workspace: str) -> dict[str, Any] | None:
        return await self._engine.call(
            f"looking up workspace {workspace!r}",
            lambda c: instances.find(c, self.agent_id, workspace),
        )

    async def _require(self, workspace: str) -> dict[str, Any]:
        info = await self._find(workspace)
        if info is None:
            raise self.missing(workspace)
        return info

    async def _require_running(self, workspace: str) -> tuple[str, source.Inside]:
        """The instance of ``workspace``, which must be running (for a command in it), and
        where commands start in it and as whom."""
        info = await self._require(workspace)
        if info.get("status") != "Running":
            raise self.not_running(workspace)
        return str(info["name"]), source.inside_of(info.get("config") or {})

    def _status(self, workspace: str, info: Mapping[str, Any]) -> EnvironmentStatus:
        return instances.status_of(self.name, workspace, info)

    async def close(self) -> None:
        await self._engine.close()

    # -- readiness -------------------------------------------------------------

    async def readiness(self) -> Readiness:
        not_installed = daemon.missing_install(self._socket)
        if not_installed is not None:
            return not_installed
        if denied := await asyncio.to_thread(socket_denied, self.where, "lxd"):
            return Readiness(
                ready=False, detail=f"LXD daemon at {self.where}: {denied}", failed=PERMITTED
            )
        try:
            return await self._engine.call(
                "checking the LXD daemon", lambda c: daemon.readiness(c, self.where)
            )
        except VendettaError as exc:
            return Readiness(ready=False, detail=exc.message, failed=failed_check(exc))

    # -- images ----------------------------------------------------------------

    async def _images(self) -> builtins.list[ImageInfo]:
        return await self._engine.call("listing images", images.image_infos)

    async def _import_image(self, name: str, files: Mapping[str, Path]) -> builtins.list[ImageInfo]:
        def check() -> tuple[Path, Path | None, str]:
            first, second = images.split(files)
            return first, second, images.fingerprint(first, second)

        first, second, digest = await asyncio.to_thread(check)
        fingerprint = await self._engine.call(
            f"importing image {name!r}",
            lambda c: images.import_image(c, name, first, second, digest),
        )
        return [i for i in await self._images() if i.id == fingerprint and i.name == name]

    # -- lifecycle -------------------------------------------------------------

    async def _create(self, spec: EnvironmentSpec) -> EnvironmentStatus:
        workspace = spec.workspace
        config = {
            KEY_MANAGED: "true",
            KEY_AGENT: self.agent_id,
            KEY_WORKSPACE: workspace,
            **instances.limits(spec),
            **{f"environment.{k}": v for k, v in spec.env.items()},
        }
        if spec.command is not None:
            config[KEY_COMMAND] = json.dumps(list(spec.command))
        if spec.owner:
            config[instances.KEY_OWNER] = spec.owner
        name = self.instance_name(workspace)
        source_config, source_devices = source.create_fields(spec)
        host_ids = None
        if spec.source_path:
            host_ids = await asyncio.to_thread(source.owner, spec.source_path)
            await asyncio.to_thread(source.check_mappable, *host_ids)

        def create_instance(client: Any) -> None:
            fingerprint = daemon.resolve_image(client, spec.image)
            response = client.api.instances.post(
                json={
                    "name": name,
                    "type": "container",
                    "source": {"type": "image", "fingerprint": fingerprint},
                    "profiles": ["default"],
                    "config": config | source_config,
                    # Published on free node ports now; start moves any taken meanwhile.
                    "devices": ports.devices_for(spec.ports) | source_devices,
                }
            )
            instances.wait(client, response)

        def set_user(client: Any) -> None:
            # Who works inside, read from the image's own files (the instance is stopped).
            fields = source.user_fields(host_ids, source.resolve_user(client, name, spec.user))
            node = client.api.instances[name]
            instances.wait_maybe(client, node.patch(json={"config": fields}))

        try:
            await self._engine.call(f"creating instance {name!r}", create_instance)
        except AlreadyExistsError as exc:
            # Taken, but not by an instance of ours (or we lost a race).
            raise self.name_taken(workspace, name, exc, f"lxc delete --force {name}") from exc
        if spec.source_path or spec.user:
            try:
                await self._engine.call(f"setting the user of {workspace!r}", set_user)
            except BaseException:
                await self._destroy(workspace)  # nothing half-made is left
                raise
        return await self._inspect(workspace)

    async def _start(self, workspace: str) -> EnvironmentStatus:
        info = await self._require(workspace)
        name = str(info["name"])
        status = info.get("status")
        if status == "Running":
            return self._status(workspace, info)
        command = (info.get("config") or {}).get(KEY_COMMAND)
        inside = source.inside_of(info.get("config") or {})
        action = f"starting {workspace!r}"

        def start_instance(client: Any) -> None:
            if status == "Frozen":
                node = client.api.instances[name]
                instances.wait(client, node.state.put(json={"action": "unfreeze"}))
                return
            instances.start_publishing(client, self.where, action, name)
            if command is not None:
                argv = launch_argv([str(a) for a in json.loads(command)])
                code, _, err = execs.run_recorded(
                    client, name, argv, {}, None, lambda: False, inside
                )
                if code != 0:
                    raise FailedPreconditionError(
                        f"workspace {workspace} started, but its command could not be "
                        f"launched (exit code {code}: {err.decode(errors='replace').strip()}); "
                        "the image needs /bin/sh and setsid"
                    )

        await self._engine.call(action, start_instance)
        return await self._inspect(workspace)

    async def _stop(self, workspace: str, timeout: float) -> EnvironmentStatus:
        info = await self._require(workspace)
        status = info.get("status")
        if status not in ("Running", "Frozen"):
            return self._status(workspace, info)
        name = str(info["name"])
        seconds = max(0, math.ceil(timeout))
        action = f"stopping {workspace!r}"
        await self._engine.call(
            action,
            lambda c: instances.stop(c, self.where, action, name, seconds, status == "Running"),
        )
        return await self._inspect(workspace)

    async def _destroy(self, workspace: str) -> None:
        action = f"removing workspace {workspace!r}"

        def remove_all(client: Any) -> None:
            for info in instances.owned(client, self.agent_id, workspace):
                name = str(info["name"])
                try:
                    if info.get("status") != "Stopped":
                        instances.force_stop(client, self.where, action, name)
                    instances.state_change(
                        client, self.where, action, name, lambda node: node.delete()
                    )
                except NotFoundError:
                    pass  # already gone: that is what we want

        await self._engine.call(action, remove_all)

    async def _inspect(self, workspace: str) -> EnvironmentStatus:
        info = await self._find(workspace)
        if info is None:
            return EnvironmentStatus(workspace=workspace, provider=self.name, state=EnvState.ABSENT)
        return self._status(workspace, info)

    async def _list(self) -> builtins.list[EnvironmentStatus]:
        infos = await self._engine.call(
            "listing environments",
            lambda c: instances.with_state(c, instances.owned(c, self.agent_id, None)),
        )
        statuses: dict[str, EnvironmentStatus] = {}
        for info in infos:  # newest first: keep the newest per workspace
            workspace = str((info.get("config") or {}).get(KEY_WORKSPACE, ""))
            if workspace and workspace not in statuses:
                statuses[workspace] = self._status(workspace, info)
        return builtins.list(statuses.values())

    # -- commands --------------------------------------------------------------

    async def _exec(
        self, workspace: str, argv: Sequence[str], env: Mapping[str, str] | None, workdir: str
    ) -> AsyncGenerator[ExecChunk, None]:
        """A pipe (see ``_pipe``) whose stdin is closed at once: the command reads
        end-of-file there. Leaving early kills its wrapper."""
        instance, inside = await self._require_running(workspace)
        pipe = await self._sessions.pipe(instance, workspace, argv, env, workdir, inside)
        try:
            await pipe.close_stdin()
            async for chunk in pipe.output():
                yield chunk
        finally:
            await pipe.close()

    async def _run(
        self, workspace: str, argv: Sequence[str], env: Mapping[str, str] | None, workdir: str
    ) -> tuple[int, bytes, bytes]:
        """Recorded by LXD, not streamed: the reliable path (see ``execs.run_recorded``)."""
        instance, inside = await self._require_running(workspace)
        return await self._sessions.run(instance, workspace, argv, env, workdir, inside)

    async def _pipe(
        self, workspace: str, argv: Sequence[str], env: Mapping[str, str] | None
    ) -> Terminal:
        instance, inside = await self._require_running(workspace)
        return await self._sessions.pipe(instance, workspace, argv, env, "", inside)

    async def _attach(
        self,
        workspace: str,
        argv: Sequence[str],
        *,
        rows: int,
        cols: int,
        env: Mapping[str, str] | None,
    ) -> Terminal:
        instance, inside = await self._require_running(workspace)
        return await self._sessions.terminal(instance, workspace, argv, env, rows, cols, inside)

    # -- logs ------------------------------------------------------------------

    async def _logs(
        self, workspace: str, *, follow: bool, tail: int | None, since_unix_nano: int
    ) -> AsyncGenerator[LogRecord, None]:
        """The command's stdout/stderr (see ``command``) and the console (PID 1's output).

        Without ``follow``: what is there now. With ``follow``: then new lines
        as they appear (polled), until the environment stops (the last lines
        are read after it stopped) or the caller cancels.
        """
        info = await self._require(workspace)
        action = f"reading logs of {workspace!r}"
        reader = LogReader(str(info["name"]), self.where)

        first = await self._engine.call(action, reader.read)
        records = [r for r in first.records if r.time_unix_nano >= since_unix_nano]
        if tail is not None:
            records = records[-tail:] if tail else []
        for record in records:
            yield record
        if not follow:
            return
        running = first.running
        while running:
            await asyncio.sleep(reader.poll_interval)
            batch = await self._engine.call(action, reader.read)
            running = batch.running
            for record in batch.records:
                yield record
