"""LxdProvider: each environment is one LXD system container on the node's LXD daemon.

Lifecycle lives here; the supervised command and its log format in
``command``, log reading in ``logs``, published ports (proxy devices) in
``ports``, interactive terminals in ``terminal`` (on the small websocket
client of ``websocket``), the error seam in ``errors``. Every
pylxd call runs in a thread (``asyncio.to_thread``, or a dedicated thread for
an exec's output).

Containers are found only by their config keys (``user.vendetta.managed``,
``user.vendetta.agent``, ``user.vendetta.workspace``), never by name alone,
so an agent finds its own after a restart and two agents sharing one LXD
daemon never see each other's.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import pylxd
import pylxd.exceptions

from common.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    ImageNotFoundError,
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
from providers.lxd import execs, ports
from providers.lxd.command import launch_argv
from providers.lxd.errors import lxd_errors, translate
from providers.lxd.logs import LogReader
from providers.lxd.terminal import LxdTerminal, open_terminal
from providers.lxd.websocket import THREAD_PREFIX, HandshakeError

T = TypeVar("T")


def _not_pool_full(record: logging.LogRecord) -> bool:
    # pylxd's unix-socket pool keeps one connection; concurrent calls open more, and
    # urllib3 warns each time it drops one. That is expected here, not news for the log.
    return not record.getMessage().startswith("Connection pool is full")


logging.getLogger("urllib3.connectionpool").addFilter(_not_pool_full)

DEFAULT_LXD_SOCKET = "/var/lib/lxd/unix.socket"

# The base labels as LXD config keys (LXD only allows user.* for free-form keys).
KEY_MANAGED = f"user.{LABEL_MANAGED}"
KEY_AGENT = f"user.{LABEL_AGENT}"
KEY_WORKSPACE = f"user.{LABEL_WORKSPACE}"
KEY_COMMAND = "user.vendetta.command"

MAX_IMAGES = 20
MAX_NAME = 63  # LXD instance names are hostnames
# How long to retry an operation LXD refuses because another one runs on the instance.
BUSY_WAIT = 30.0
# Starts tried when a published port's node port is taken between our check and LXD's listen.
START_ATTEMPTS = 3
# A terminal's TERM unless the caller gives one (LXD sets none; Docker gives xterm).
DEFAULT_TERM = "xterm"

INIT_HINT = "LXD is not initialised: run `lxd init --auto` or scripts/engine-lxd.sh"
IMAGE_HINT = (
    "import it on the node (`lxc image import META ROOTFS --alias NAME`, or "
    "scripts/engine-lxd.sh for vendetta/busybox) or set lxd.image in .vendetta/config.yaml"
)

_UNSAFE = re.compile(r"[^a-z0-9-]")


def _state_of(status: str, config: Mapping[str, Any]) -> EnvState:
    if status == "Running":
        return EnvState.RUNNING
    if status == "Stopped":
        # LXD records the power state once an instance has run.
        return EnvState.STOPPED if "volatile.last_state.power" in config else EnvState.CREATED
    if status in ("Frozen", "Error", "Aborting", "Stopping"):
        return EnvState.STOPPED
    return EnvState.UNKNOWN


def _addresses(state: Mapping[str, Any] | None) -> tuple[str, ...]:
    found: builtins.list[str] = []
    for name, iface in ((state or {}).get("network") or {}).items():
        if name == "lo":
            continue
        for address in (iface or {}).get("addresses") or ():
            if address.get("scope") == "global" and address.get("address") not in found:
                found.append(str(address["address"]))
    return tuple(found)


def _check_ports(published: Sequence[int]) -> None:
    for port in published:
        if not 1 <= port <= 65535:
            raise InvalidArgumentError(f"port {port} is out of range (1-65535)")


def _limits(spec: EnvironmentSpec) -> dict[str, str]:
    config: dict[str, str] = {}
    if spec.cpus is not None:
        if spec.cpus <= 0:
            raise InvalidArgumentError(f"cpus must be positive, got {spec.cpus}")
        config["limits.cpu"] = str(math.ceil(spec.cpus))
        if spec.cpus != math.ceil(spec.cpus):
            # A fraction of CPU time: the quota per 100 ms period, across all CPUs.
            config["limits.cpu.allowance"] = f"{round(spec.cpus * 100)}ms/100ms"
    if spec.memory_bytes is not None:
        if spec.memory_bytes <= 0:
            raise InvalidArgumentError(f"memory must be positive, got {spec.memory_bytes} bytes")
        config["limits.memory"] = f"{spec.memory_bytes}B"
    return config


class LxdProvider(Provider):
    """Environments as system containers on the local LXD daemon, driven with pylxd 2.4."""

    name: ClassVar[str] = "lxd"
    capabilities: ClassVar[Capabilities] = Capabilities(
        exec=True,
        follow_logs=True,
        resource_limits=True,
        virtual_machine=False,
        # Services are detached and polled: streamed execs of LXD 5.0 lose output at
        # their end (see execs.DRAIN_WRAPPER), and each holds four sockets and a thread.
        long_exec_streams=False,
        # attach() and pipe() open their own websockets (providers.lxd.websocket).
        terminal=True,
        stdin=True,
    )

    def __init__(self, agent_id: str, endpoint: str | None = None) -> None:
        """``endpoint`` None: LXD's local unix socket (``$LXD_DIR`` or /var/lib/lxd).

        Nothing connects here: the client is made on first use, in a thread.
        """
        if not agent_id:
            raise InvalidArgumentError("agent id must not be empty")
        super().__init__(agent_id)
        self._endpoint = endpoint
        lxd_dir = os.environ.get("LXD_DIR")
        socket = os.path.join(lxd_dir, "unix.socket") if lxd_dir else DEFAULT_LXD_SOCKET
        self.where = endpoint or f"unix://{socket}"
        self._socket = None if endpoint else socket
        self._client: Any = None
        self._client_lock = asyncio.Lock()
        self._hangups: set[asyncio.Future[None]] = set()

    # -- plumbing --------------------------------------------------------------

    def _connect(self) -> Any:
        # pylxd asks the daemon for /1.0 here: it blocks.
        return pylxd.Client(endpoint=self._endpoint)

    async def _lxd(self) -> Any:
        """The pylxd client, made on first use (failures are not cached)."""
        client = self._client
        if client is None:
            async with self._client_lock:
                client = self._client
                if client is None:
                    with lxd_errors(self.where, "connecting to LXD"):
                        client = await asyncio.to_thread(self._connect)
                    self._client = client
        return client

    async def _run(self, action: str, fn: Callable[[Any], T]) -> T:
        """Run ``fn(client)`` in a thread; its pylxd errors come out as common.errors."""
        client = await self._lxd()
        with lxd_errors(self.where, action):
            return await asyncio.to_thread(fn, client)

    def instance_name(self, workspace: str) -> str:
        """``vd-{workspace}-{agent_id[:8]}``, shortened (with a hash) to fit 63 characters."""
        suffix = _UNSAFE.sub("-", self.agent_id[:8].lower()).strip("-") or "agent"
        name = f"vd-{workspace}-{suffix}"
        if len(name) <= MAX_NAME:
            return name
        digest = hashlib.sha256(workspace.encode()).hexdigest()[:8]
        room = MAX_NAME - len(f"vd--{digest}-{suffix}")
        return f"vd-{workspace[:room].rstrip('-')}-{digest}-{suffix}"

    def _owned(self, info: Mapping[str, Any], workspace: str | None) -> bool:
        config = info.get("config") or {}
        return (
            config.get(KEY_MANAGED) == "true"
            and config.get(KEY_AGENT) == self.agent_id
            and (workspace is None or config.get(KEY_WORKSPACE) == workspace)
        )

    def _instances(self, client: Any, workspace: str | None) -> builtins.list[dict[str, Any]]:
        """This agent's instances (for one workspace), newest first. Blocking."""
        response = client.api.instances.get(params={"recursion": 1})
        infos = [i for i in response.json()["metadata"] if self._owned(i, workspace)]
        infos.sort(key=lambda i: str(i.get("created_at", "")), reverse=True)
        return infos

    def _find_sync(self, client: Any, workspace: str) -> dict[str, Any] | None:
        """The workspace's instance (config, status, and live state), or None. Blocking."""
        for info in self._instances(client, workspace):
            try:
                state = client.api.instances[info["name"]].state.get().json()["metadata"]
            except pylxd.exceptions.NotFound:
                continue  # vanished between list and state
            return {**info, "state": state}
        return None

    async def _find(self, workspace: str) -> dict[str, Any] | None:
        return await self._run(
            f"looking up workspace {workspace!r}", lambda c: self._find_sync(c, workspace)
        )

    async def _require(self, workspace: str) -> dict[str, Any]:
        info = await self._find(workspace)
        if info is None:
            raise self.missing(workspace)
        return info

    def _status(self, workspace: str, info: Mapping[str, Any]) -> EnvironmentStatus:
        config = info.get("config") or {}
        status = str(info.get("status") or "")
        state = info.get("state")
        detail = f"lxd status {status or 'unknown'}"
        if KEY_COMMAND in config:
            detail += ", command supervised by the agent"
        return EnvironmentStatus(
            workspace=workspace,
            provider=self.name,
            state=_state_of(status, config),
            id=str(info.get("name", "")),
            image=str(config.get("image.description") or config.get("volatile.base_image", "")),
            addresses=_addresses(state),
            detail=detail,
            # Proxy devices listen only while the instance runs.
            ports=ports.published(info.get("devices") or {}) if status == "Running" else {},
        )

    @staticmethod
    def _not_running(workspace: str) -> str:
        return f"workspace {workspace} is not running: run `vendetta workspace up {workspace}`"

    @staticmethod
    def _wait(client: Any, response: Any) -> None:
        """Wait for the background operation of ``response``; raises if it failed."""
        client.operations.wait_for_operation(response.json()["operation"])

    @classmethod
    def _state_change(
        cls, client: Any, name: str, request: Callable[[Any], Any], done_if: str = ""
    ) -> None:
        """Make ``request(instance node)`` and wait for it, retrying while LXD is busy.

        An instance runs one state operation at a time: a forced stop or a delete
        right after a graceful stop gave up is refused ("busy running a stop
        operation") until LXD has finished with that one.
        """
        deadline = time.monotonic() + BUSY_WAIT
        while True:
            try:
                cls._wait(client, request(client.api.instances[name]))
                return
            except pylxd.exceptions.LXDAPIException as exc:
                if isinstance(exc, pylxd.exceptions.NotFound):
                    raise
                if done_if and done_if in str(exc).lower():
                    return  # e.g. a stop that raced with the instance stopping by itself
                if "is busy running" not in str(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(0.2)

    @classmethod
    def _start_publishing(cls, client: Any, name: str) -> None:
        """Start the stopped instance ``name``, its published ports on free node ports. Blocking.

        A node port taken since it was chosen (by anything on the node) is
        replaced first; if one is taken between that check and LXD's listen,
        the start fails, and is tried again with fresh ports for all.
        """
        node = client.api.instances[name]
        for attempt in range(1, START_ATTEMPTS + 1):
            devices = node.get().json()["metadata"].get("devices") or {}
            moved = ports.repicked(devices, everything=attempt > 1)
            if moved:
                # PATCH merges: the devices named here are replaced, the others kept.
                cls._wait_maybe(client, node.patch(json={"devices": moved}))
            try:
                cls._wait(client, node.state.put(json={"action": "start"}))
                return
            except pylxd.exceptions.LXDAPIException as exc:
                if attempt == START_ATTEMPTS or not ports.is_listen_failure(str(exc)):
                    raise

    @staticmethod
    def _wait_maybe(client: Any, response: Any) -> None:
        """Wait for ``response``'s operation if LXD answered with one (PATCH may be sync)."""
        body = response.json()
        if body.get("type") == "async" and body.get("operation"):
            client.operations.wait_for_operation(body["operation"])

    # -- readiness -------------------------------------------------------------

    async def readiness(self) -> Readiness:
        if self._socket and not os.path.exists(self._socket):
            installed = any(
                os.access(os.path.join(d, "lxd"), os.X_OK)
                for d in os.environ.get("PATH", "").split(os.pathsep)
            )
            if not installed:
                return Readiness(
                    ready=False,
                    detail="LXD is not installed: `apt-get install -y lxd` "
                    "(or run scripts/engine-lxd.sh)",
                )

        def probe(client: Any) -> tuple[dict[str, Any], builtins.list[str], str]:
            host: dict[str, Any] = client.api.get().json()["metadata"]
            pools = [
                p.rsplit("/", 1)[-1] for p in client.api["storage-pools"].get().json()["metadata"]
            ]
            problem = ""
            if "default" not in pools:
                problem = f"{INIT_HINT} (no storage pool named default)"
            else:
                profile = client.api.profiles["default"].get().json()["metadata"]
                disks = [
                    d
                    for d in (profile.get("devices") or {}).values()
                    if d.get("type") == "disk" and d.get("path") == "/"
                ]
                if not disks:
                    problem = f"{INIT_HINT} (the default profile has no root disk)"
            names: builtins.list[str] = []
            for image in client.api.images.get(params={"recursion": 1}).json()["metadata"]:
                aliases = [a["name"] for a in image.get("aliases") or ()]
                names.extend(aliases or [str(image.get("fingerprint", ""))[:12]])
            return host, sorted(names), problem

        try:
            host, images, problem = await self._run("checking the LXD daemon", probe)
        except VendettaError as exc:
            return Readiness(ready=False, detail=exc.message)
        env = host.get("environment") or {}
        version = str(env.get("server_version", "?"))
        if problem:
            return Readiness(ready=False, detail=problem, version=version)
        return Readiness(
            ready=True,
            detail=(
                f"LXD {version} ({env.get('driver', '?')} {env.get('driver_version', '')}, "
                f"storage {env.get('storage', '?')}) at {self.where}"
            ),
            version=version,
            images=tuple(images[:MAX_IMAGES]),
        )

    # -- lifecycle -------------------------------------------------------------

    def _resolve_image(self, client: Any, image: str) -> str:
        """The fingerprint of ``image`` (an alias or a fingerprint prefix). Blocking."""
        with contextlib.suppress(pylxd.exceptions.NotFound):
            alias = client.api.images.aliases[image].get().json()["metadata"]
            return str(alias["target"])
        if re.fullmatch(r"[0-9a-f]{6,64}", image):
            with contextlib.suppress(pylxd.exceptions.NotFound):
                return str(client.api.images[image].get().json()["metadata"]["fingerprint"])
        names: builtins.list[str] = []
        for info in client.api.images.get(params={"recursion": 1}).json()["metadata"]:
            aliases = [a["name"] for a in info.get("aliases") or ()]
            names.extend(aliases or [str(info.get("fingerprint", ""))[:12]])
        have = ", ".join(sorted(names)[:MAX_IMAGES]) or "none"
        raise ImageNotFoundError(
            f"image {image!r} is not on this node's LXD (images here: {have}): {IMAGE_HINT}"
        )

    async def create(self, spec: EnvironmentSpec) -> EnvironmentStatus:
        workspace = validate_name("workspace", spec.workspace)
        if not spec.image:
            raise InvalidArgumentError(
                f"workspace {workspace!r} has no image: set lxd.image in .vendetta/config.yaml"
            )
        if spec.command is not None and not spec.command:
            raise InvalidArgumentError("command must not be empty (leave it unset to idle)")
        check_env(spec.env)
        _check_ports(spec.ports)
        config = {
            KEY_MANAGED: "true",
            KEY_AGENT: self.agent_id,
            KEY_WORKSPACE: workspace,
            **_limits(spec),
            **{f"environment.{k}": v for k, v in spec.env.items()},
        }
        if spec.command is not None:
            config[KEY_COMMAND] = json.dumps(list(spec.command))

        existing = await self._find(workspace)
        if existing is not None:
            raise AlreadyExistsError(
                f"workspace {workspace!r} already has an LXD environment on this node "
                f"({self._status(workspace, existing).detail}): start it with "
                f"`vendetta workspace up {workspace}` or remove it with "
                f"`vendetta workspace destroy {workspace}`"
            )
        name = self.instance_name(workspace)

        def create_instance(client: Any) -> None:
            fingerprint = self._resolve_image(client, spec.image)
            response = client.api.instances.post(
                json={
                    "name": name,
                    "type": "container",
                    "source": {"type": "image", "fingerprint": fingerprint},
                    "profiles": ["default"],
                    "config": config,
                    # Published on free node ports now; start moves any taken meanwhile.
                    "devices": ports.devices_for(spec.ports),
                }
            )
            self._wait(client, response)

        try:
            await self._run(f"creating instance {name!r}", create_instance)
        except AlreadyExistsError as exc:
            raise AlreadyExistsError(
                f"cannot create workspace {workspace!r}: the instance name {name!r} is "
                f"already taken on this LXD ({exc}); if it is a leftover, remove it with "
                f"`lxc delete --force {name}`"
            ) from exc
        return await self.inspect(workspace)

    async def start(self, workspace: str) -> EnvironmentStatus:
        validate_name("workspace", workspace)
        info = await self._require(workspace)
        name = str(info["name"])
        status = info.get("status")
        if status == "Running":
            return self._status(workspace, info)
        command = (info.get("config") or {}).get(KEY_COMMAND)

        def start_instance(client: Any) -> None:
            action = "unfreeze" if status == "Frozen" else "start"
            if action == "unfreeze":
                self._wait(client, client.api.instances[name].state.put(json={"action": action}))
            else:
                self._start_publishing(client, name)
            if command is not None and action == "start":
                argv = launch_argv([str(a) for a in json.loads(command)])
                code, _, err = execs.run_recorded(client, name, argv, {}, None, lambda: False)
                if code != 0:
                    raise FailedPreconditionError(
                        f"workspace {workspace} started, but its command could not be "
                        f"launched (exit code {code}: {err.decode(errors='replace').strip()}); "
                        "the image needs /bin/sh and setsid"
                    )

        await self._run(f"starting {workspace!r}", start_instance)
        return await self.inspect(workspace)

    async def stop(self, workspace: str, timeout: float = 10.0) -> EnvironmentStatus:
        validate_name("workspace", workspace)
        info = await self._require(workspace)
        name = str(info["name"])
        if info.get("status") not in ("Running", "Frozen"):
            return self._status(workspace, info)
        seconds = max(0, math.ceil(timeout))

        def stop_instance(client: Any) -> None:
            if seconds > 0 and info.get("status") == "Running":
                # Init's halt signal (SIGPWR), then force once `seconds` have passed.
                try:
                    self._state_change(
                        client,
                        name,
                        lambda node: node.state.put(json={"action": "stop", "timeout": seconds}),
                    )
                    return
                except pylxd.exceptions.LXDAPIException:
                    current = client.api.instances[name].state.get().json()["metadata"]
                    if current.get("status") == "Stopped":
                        return
            self._state_change(
                client,
                name,
                lambda node: node.state.put(json={"action": "stop", "force": True}),
                "already stopped",
            )

        await self._run(f"stopping {workspace!r}", stop_instance)
        return await self.inspect(workspace)

    async def destroy(self, workspace: str) -> None:
        validate_name("workspace", workspace)

        def remove_all(client: Any) -> None:
            for info in self._instances(client, workspace):
                name = str(info["name"])
                try:
                    if info.get("status") != "Stopped":
                        self._state_change(
                            client,
                            name,
                            lambda node: node.state.put(json={"action": "stop", "force": True}),
                            "already stopped",
                        )
                    self._state_change(client, name, lambda node: node.delete())
                except pylxd.exceptions.NotFound:
                    pass  # already gone: that is what we want

        await self._run(f"removing workspace {workspace!r}", remove_all)

    async def inspect(self, workspace: str) -> EnvironmentStatus:
        validate_name("workspace", workspace)
        info = await self._find(workspace)
        if info is None:
            return EnvironmentStatus(workspace=workspace, provider=self.name, state=EnvState.ABSENT)
        return self._status(workspace, info)

    async def list(self) -> builtins.list[EnvironmentStatus]:
        def find_all(client: Any) -> builtins.list[dict[str, Any]]:
            infos = []
            for info in self._instances(client, None):
                try:
                    state = client.api.instances[info["name"]].state.get().json()["metadata"]
                except pylxd.exceptions.NotFound:
                    continue
                infos.append({**info, "state": state})
            return infos

        infos = await self._run("listing environments", find_all)
        statuses: dict[str, EnvironmentStatus] = {}
        for info in infos:  # newest first: keep the newest per workspace
            workspace = str((info.get("config") or {}).get(KEY_WORKSPACE, ""))
            if workspace and workspace not in statuses:
                statuses[workspace] = self._status(workspace, info)
        return [statuses[w] for w in sorted(statuses)]

    async def close(self) -> None:
        client, self._client = self._client, None
        session = getattr(getattr(client, "api", None), "session", None)
        if session is not None:
            await asyncio.to_thread(session.close)

    # -- exec ------------------------------------------------------------------

    async def exec(
        self,
        workspace: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        workdir: str = "",
    ) -> AsyncGenerator[ExecChunk, None]:
        """Run argv (no shell) in the running environment; output chunks, then the exit code.

        A pipe (see ``pipe``) whose stdin is closed at once: the command reads
        end-of-file there. Leaving early kills its wrapper.
        """
        pipe = await self._pipe(workspace, argv, env, workdir)
        try:
            await pipe.close_stdin()
            async for chunk in pipe.output():
                yield chunk
        finally:
            await pipe.close()

    async def _running(
        self, workspace: str, argv: Sequence[str], env: Mapping[str, str] | None, what: str
    ) -> str:
        """The instance of a running ``workspace`` to run ``argv`` in, after the checks
        every command (``what``: exec, a terminal) needs."""
        validate_name("workspace", workspace)
        if not argv:
            raise InvalidArgumentError(f"{what} needs a command: argv is empty")
        check_env(env or {})
        info = await self._require(workspace)
        if info.get("status") != "Running":
            raise FailedPreconditionError(self._not_running(workspace))
        return str(info["name"])

    async def pipe(
        self, workspace: str, argv: Sequence[str], env: Mapping[str, str] | None = None
    ) -> Terminal:
        """argv on pipes, over websocket-client sockets of our own (see ``execs``)."""
        return await self._pipe(workspace, argv, env, "")

    async def _pipe(
        self, workspace: str, argv: Sequence[str], env: Mapping[str, str] | None, workdir: str
    ) -> execs.LxdPipe:
        name = await self._running(workspace, argv, env, "exec")
        action = f"running {argv[0]!r} in {workspace!r}"

        def as_exec_error(exc: BaseException) -> VendettaError:
            if isinstance(exc, HandshakeError):
                return FailedPreconditionError(f"{action}: LXD refused the exec: {exc}")
            error = translate(exc, where=self.where, action=action)
            if isinstance(error, FailedPreconditionError) and "not running" in str(error):
                return FailedPreconditionError(self._not_running(workspace))
            return error

        try:
            ex = await self._run(
                action, lambda c: execs.open_exec(c, name, argv, env or {}, workdir or None)
            )
        except (HandshakeError, OSError, FailedPreconditionError) as exc:
            raise as_exec_error(exc) from exc
        return execs.LxdPipe(await self._lxd(), ex, workspace, as_exec_error)

    async def run(
        self,
        workspace: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        workdir: str = "",
    ) -> tuple[int, bytes, bytes]:
        """Run argv to completion, its output recorded by LXD (see ``execs.run_recorded``).

        In a daemon thread of its own, not an executor slot: a command may run for
        long. Cancelling stops the wait; the command runs on, as LXD cannot stop it.
        """
        name = await self._running(workspace, argv, env, "exec")
        action = f"running {argv[0]!r} in {workspace!r}"
        client = await self._lxd()
        loop = asyncio.get_running_loop()
        result: asyncio.Future[tuple[int, bytes, bytes]] = loop.create_future()

        def deliver(outcome: tuple[int, bytes, bytes] | BaseException) -> None:
            if result.done():
                return  # cancelled: nobody waits
            if isinstance(outcome, BaseException):
                result.set_exception(outcome)
            else:
                result.set_result(outcome)

        def work() -> None:
            outcome: tuple[int, bytes, bytes] | BaseException
            try:
                with lxd_errors(self.where, action):
                    outcome = execs.run_recorded(
                        client, name, argv, env or {}, workdir or None, result.done
                    )
            except Exception as exc:
                outcome = exc
            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(deliver, outcome)

        threading.Thread(target=work, name=f"{THREAD_PREFIX}run-{workspace}", daemon=True).start()
        try:
            return await result
        except FailedPreconditionError as exc:
            if "not running" in str(exc):  # stopped since we looked
                raise FailedPreconditionError(self._not_running(workspace)) from exc
            raise

    async def attach(
        self,
        workspace: str,
        argv: Sequence[str],
        *,
        rows: int,
        cols: int,
        env: Mapping[str, str] | None = None,
    ) -> Terminal:
        """An interactive exec on a PTY of ``rows`` x ``cols`` (see ``terminal``)."""
        name = await self._running(workspace, argv, env, "a terminal")
        action = f"opening a terminal in {workspace!r}"
        environment = {"TERM": DEFAULT_TERM, **(env or {})}

        def open_(client: Any) -> LxdTerminal:
            try:
                operation, data, control = open_terminal(
                    client, name, argv, environment, rows, cols
                )
            except HandshakeError as exc:
                raise FailedPreconditionError(f"{action}: LXD refused the terminal: {exc}") from exc
            return LxdTerminal(client, operation, data, control, workspace)

        opening = asyncio.ensure_future(self._run(action, open_))
        try:
            return await asyncio.shield(opening)
        except FailedPreconditionError as exc:
            if "not running" in str(exc):  # stopped since we looked
                raise FailedPreconditionError(self._not_running(workspace)) from exc
            raise
        except asyncio.CancelledError:
            # Cancelled while LXD was starting it: hang the terminal up once it is open,
            # so no shell is left running inside with nobody attached.
            def abandon(task: asyncio.Future[LxdTerminal]) -> None:
                if not task.cancelled() and task.exception() is None:
                    hang_up = asyncio.ensure_future(task.result().close())
                    self._hangups.add(hang_up)
                    hang_up.add_done_callback(self._hangups.discard)

            opening.add_done_callback(abandon)
            raise

    # -- logs ------------------------------------------------------------------

    async def logs(
        self, workspace: str, *, follow: bool, tail: int | None, since_unix_nano: int = 0
    ) -> AsyncGenerator[LogRecord, None]:
        """The command's stdout/stderr (see ``command``) and the console (PID 1's output).

        Without ``follow``: what is there now. With ``follow``: then new lines
        as they appear (polled), until the environment stops (the last lines
        are read after it stopped) or the caller cancels.
        """
        validate_name("workspace", workspace)
        if tail is not None and tail < 0:
            raise InvalidArgumentError(f"tail must be 0 or more, got {tail}")
        if since_unix_nano < 0:
            raise InvalidArgumentError(f"since must be 0 or more, got {since_unix_nano}")
        info = await self._require(workspace)
        name = str(info["name"])
        action = f"reading logs of {workspace!r}"
        reader = LogReader(name)

        first = await self._run(action, reader.read)
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
            batch = await self._run(action, reader.read)
            running = batch.running
            for record in batch.records:
                yield record
