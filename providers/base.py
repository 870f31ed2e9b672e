"""The one async provider interface, its plain data types and capability flags."""

from __future__ import annotations

import abc
import builtins
import contextlib
import enum
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from common.batching import batched
from common.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    NotRunningError,
    PermissionDeniedError,
    UnavailableError,
    VendettaError,
)
from common.names import validate_name
from providers.checks import check_command, check_image_import, check_spec

# Labels (or their equivalent) every provider puts on what it creates, so an
# agent finds its own environments again after a restart.
LABEL_MANAGED = "vendetta.managed"
LABEL_AGENT = "vendetta.agent"
LABEL_WORKSPACE = "vendetta.workspace"
# Where the workspace's source is inside (the default folder of commands), and how it
# got there: remembered by the provider so that ``inspect`` and later commands know.
LABEL_WORKDIR = "vendetta.workdir"
LABEL_SOURCE_MODE = "vendetta.source_mode"
# The coordinator that asked for the environment (its id), so that one coordinator
# tells its own leftovers from another's that shares the node's user.
LABEL_OWNER = "vendetta.coordinator"

# Where the source is inside when the spec names no workdir.
DEFAULT_WORKDIR = "/workspace"
# How the source is inside: the node's folder itself (edits seen both ways at once),
# or a copy made when the environment first started.
SOURCE_MOUNTED = "mounted"
SOURCE_COPIED = "copied"


class EnvState(enum.Enum):
    ABSENT = "absent"
    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Capabilities:
    """What differs between providers; callers branch on these, never on names."""

    # exec streams output as it comes and may stay open for hours: the service
    # supervisor then follows processes and logs through it; otherwise it polls.
    long_exec_streams: bool = True
    # attach() gives an interactive terminal (PTY, stdin, resize)
    terminal: bool = False
    # pipe() passes stdin to the command (else it runs with none, as with exec)
    stdin: bool = False


@dataclass(frozen=True)
class Readiness:
    """Whether the provider's engine can be used on this node, and why not."""

    ready: bool
    detail: str
    version: str = ""
    images: tuple[str, ...] = ()
    # When not ready, the first of CHECKS that failed (`node test` shows them in order).
    failed: str = ""
    # How environments run, where the engine has a choice ("KVM", "emulation (TCG)").
    mode: str = ""


# What `node test` checks of each provider, in order: its SDK imports; its engine
# answers; it lets the agent's user in; it can run environments; it has images.
INSTALLED, REACHABLE, PERMITTED, USABLE, IMAGES = CHECKS = (
    "installed",
    "reachable",
    "permitted",
    "usable",
    "images",
)


def failed_check(exc: VendettaError) -> str:
    """Which check an engine's error in a readiness probe fails."""
    if isinstance(exc, PermissionDeniedError):
        return PERMITTED
    if isinstance(exc, UnavailableError):
        return REACHABLE
    return USABLE


@dataclass(frozen=True)
class ImageInfo:
    """One image on the engine, by the name a workspace's config gives as its image."""

    name: str  # Docker: repository:tag; LXD: alias (or short fingerprint); QEMU: folder
    size_bytes: int = 0
    created_unix_nano: int = 0
    id: str = ""  # the engine's own id (Docker image id, LXD fingerprint)


@dataclass(frozen=True)
class EnvironmentSpec:
    workspace: str
    image: str
    # None: keep the environment alive with an idle init process.
    command: Sequence[str] | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    cpus: float | None = None
    memory_bytes: int | None = None
    disk_bytes: int | None = None
    # Ports inside to publish on the node's loopback (never on other addresses).
    ports: tuple[int, ...] = ()
    # A folder on the node holding the workspace's source, put at ``workdir`` inside
    # (mounted, or copied where the engine cannot mount); "": no source.
    source_path: str = ""
    # Where the source is inside, and where commands start; "": DEFAULT_WORKDIR.
    workdir: str = ""
    # Who works inside (name, uid or uid:gid) and owns workdir's files; "": the image's.
    user: str = ""
    # The git directory the source's .git file points into (a worktree's repository on
    # the node), mounted at the same path inside so git works there; "": none.
    git_dir: str = ""
    # The id of the coordinator asking for it (LABEL_OWNER); "": not labelled.
    owner: str = ""

    @property
    def source_workdir(self) -> str:
        """Where the source goes inside ("" without a source)."""
        return (self.workdir or DEFAULT_WORKDIR) if self.source_path else ""


@dataclass(frozen=True)
class EnvironmentStatus:
    workspace: str
    provider: str
    state: EnvState
    id: str = ""
    image: str = ""
    addresses: tuple[str, ...] = ()
    detail: str = ""
    # port inside -> "127.0.0.1:PORT" on the node, for published ports of a running env
    ports: Mapping[int, str] = field(default_factory=dict)
    # SOURCE_MOUNTED | SOURCE_COPIED | "" (no source), and where it is inside
    source_mode: str = ""
    workdir: str = ""
    owner: str = ""  # LABEL_OWNER: the coordinator that made it ("": not labelled)


@dataclass(frozen=True)
class LogRecord:
    """One line of output; ``text`` has no trailing newline."""

    time_unix_nano: int
    stream: str  # "stdout" | "stderr" | "console"
    text: str
    service: str = ""


@dataclass(frozen=True)
class ExecChunk:
    """Output of a command run inside an environment; the last chunk has exit_code set."""

    stdout: bytes = b""
    stderr: bytes = b""
    exit_code: int | None = None


class Terminal(abc.ABC):
    """A session inside an environment: on a pseudo-terminal, or on plain pipes
    (see ``Provider.pipe``), whose output keeps stdout and stderr apart."""

    @abc.abstractmethod
    def output(self) -> AsyncIterator[ExecChunk]:
        """What the terminal prints; the last chunk carries the exit code."""

    @abc.abstractmethod
    async def write(self, data: bytes) -> None: ...

    @abc.abstractmethod
    async def resize(self, rows: int, cols: int) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def close_stdin(self) -> None:
        """No more input: the command reads end-of-file (pipes; a terminal ignores it)."""


class _NoStdin(Terminal):
    """A command run with ``exec``: its stdin is at end-of-file, what is written is dropped."""

    def __init__(self, first: ExecChunk, output: AsyncIterator[ExecChunk]) -> None:
        self._first: ExecChunk | None = first
        self._output = output

    async def output(self) -> AsyncIterator[ExecChunk]:
        if self._first is not None:
            first, self._first = self._first, None
            yield first
            if first.exit_code is not None:
                return
        async for chunk in self._output:
            yield chunk

    async def write(self, data: bytes) -> None:
        pass

    async def resize(self, rows: int, cols: int) -> None:
        pass

    async def close(self) -> None:
        aclose = getattr(self._output, "aclose", None)
        if aclose is not None:
            await aclose()


class Provider(abc.ABC):
    """Drives one engine on the local node: the contract every engine keeps.

    The public methods are the contract and are not overridden: they check their
    arguments once, turn an engine's ``NotRunningError`` into the one message
    users see, then call the engine's hooks (``_create``, ``_start``, ``_stop``,
    ``_destroy``, ``_inspect``, ``_list``, ``_exec``, ``_run``, ``_logs``,
    ``_attach``, ``_pipe``, ``_images``, ``_import_image``). Hooks get valid arguments
    and raise ``common.errors``
    only; every SDK call in them runs off the event loop (``providers.threaded``).
    """

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    # ``import_image``: whether the image needs a name given (Docker's files name it),
    # and what files the engine takes, as users read it in errors and help.
    import_needs_name: ClassVar[bool] = True
    image_formats: ClassVar[str] = ""

    def __init__(self, agent_id: str) -> None:
        if not agent_id:
            raise InvalidArgumentError("agent id must not be empty")
        # Environments are labelled with the agent's id: two agents sharing one
        # engine (two nodes on one host) never touch each other's.
        self.agent_id = agent_id

    # -- the errors every engine raises, worded once ----------------------------

    def missing(self, workspace: str) -> NotFoundError:
        """The error for a workspace that has no environment of this provider here."""
        return NotFoundError(
            f"workspace {workspace!r} has no {self.name} environment on this node: create "
            f"it with `vendetta workspace create {workspace}`, then `vendetta workspace up`"
        )

    def not_running(self, workspace: str) -> NotRunningError:
        return NotRunningError(
            f"workspace {workspace} is not running: run `vendetta workspace up {workspace}`"
        )

    def already_exists(self, workspace: str, detail: str) -> AlreadyExistsError:
        return AlreadyExistsError(
            f"workspace {workspace!r} already has an environment on this node "
            f"({self.name}: {detail}): start it with `vendetta workspace up {workspace}` "
            f"or remove it with `vendetta workspace destroy {workspace}`"
        )

    def name_taken(
        self, workspace: str, name: str, cause: Exception, remove: str
    ) -> AlreadyExistsError:
        """An engine name of ours held by something that is not ours (or a create we
        lost a race to): which name, and how to clear a leftover."""
        return AlreadyExistsError(
            f"cannot create workspace {workspace!r}: the name {name!r} is already taken on "
            f"this node's {self.name} engine ({cause}); if it is a leftover, remove it with "
            f"`{remove}`"
        )

    @contextlib.contextmanager
    def _running(self, workspace: str) -> Iterator[None]:
        """An engine's NotRunningError (stopped before or during the call) as users see it."""
        try:
            yield
        except NotRunningError as exc:
            raise self.not_running(workspace) from exc

    # -- the contract ------------------------------------------------------------

    @abc.abstractmethod
    async def readiness(self) -> Readiness: ...

    async def create(self, spec: EnvironmentSpec) -> EnvironmentStatus:
        """Create the environment, stopped. AlreadyExistsError if it exists."""
        check_spec(self.name, spec)
        existing = await self._inspect(spec.workspace)
        if existing.state is not EnvState.ABSENT:
            raise self.already_exists(spec.workspace, existing.detail or existing.state.value)
        return await self._create(spec)

    async def start(self, workspace: str) -> EnvironmentStatus:
        """Start it; a running environment is left as it is."""
        validate_name("workspace", workspace)
        return await self._start(workspace)

    async def stop(self, workspace: str, timeout: float = 10.0) -> EnvironmentStatus:
        """Stop gracefully, forcing after ``timeout``; a stopped one is left as it is."""
        validate_name("workspace", workspace)
        if timeout < 0:
            raise InvalidArgumentError(f"the stop timeout must be 0 or more, got {timeout}")
        return await self._stop(workspace, timeout)

    async def destroy(self, workspace: str) -> None:
        """Remove it and everything it owns; absent is not an error."""
        validate_name("workspace", workspace)
        await self._destroy(workspace)

    async def inspect(self, workspace: str) -> EnvironmentStatus:
        """State of one environment; state ABSENT when it does not exist."""
        validate_name("workspace", workspace)
        return await self._inspect(workspace)

    async def list(self) -> builtins.list[EnvironmentStatus]:
        """Every environment this agent owns on the engine, sorted by workspace."""
        return sorted(await self._list(), key=lambda status: status.workspace)

    async def exec(
        self,
        workspace: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        workdir: str = "",
    ) -> AsyncGenerator[ExecChunk, None]:
        """Run argv (no shell) inside; yield output, then one chunk with exit_code.

        Closing the generator early ends the stream (the command may run on where
        the engine cannot kill it)."""
        validate_name("workspace", workspace)
        check_command("exec", argv, env)
        with self._running(workspace):
            async with contextlib.aclosing(self._exec(workspace, argv, env, workdir)) as chunks:
                async for chunk in chunks:
                    yield chunk

    async def run(
        self,
        workspace: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        workdir: str = "",
    ) -> tuple[int, bytes, bytes]:
        """Run argv to completion: (exit code, stdout, stderr), for output wanted whole."""
        validate_name("workspace", workspace)
        check_command("run", argv, env)
        with self._running(workspace):
            return await self._run(workspace, argv, env, workdir)

    async def logs(
        self, workspace: str, *, follow: bool, tail: int | None, since_unix_nano: int = 0
    ) -> AsyncGenerator[LogRecord, None]:
        """The environment's own output; with follow, until it stops or the caller cancels."""
        _check_logs(workspace, tail, since_unix_nano)
        async with contextlib.aclosing(
            self._logs(workspace, follow=follow, tail=tail, since_unix_nano=since_unix_nano)
        ) as records:
            async for record in records:
                yield record

    async def log_batches(
        self, workspace: str, *, follow: bool, tail: int | None, since_unix_nano: int = 0
    ) -> AsyncGenerator[builtins.list[LogRecord], None]:
        """logs(), a list at a time: lines the engine handed over together stay together,
        so a busy log costs a step per batch here, not per line."""
        _check_logs(workspace, tail, since_unix_nano)
        async with contextlib.aclosing(
            self._log_batches(workspace, follow=follow, tail=tail, since_unix_nano=since_unix_nano)
        ) as batches:
            async for batch in batches:
                yield batch

    async def attach(
        self,
        workspace: str,
        argv: Sequence[str],
        *,
        rows: int,
        cols: int,
        env: Mapping[str, str] | None = None,
    ) -> Terminal:
        """An interactive terminal running argv; only where capabilities.terminal."""
        validate_name("workspace", workspace)
        check_command("a terminal", argv, env)
        if rows < 0 or cols < 0:
            raise InvalidArgumentError(f"a terminal cannot be {rows}x{cols}")
        if not self.capabilities.terminal:
            raise FailedPreconditionError(
                f"interactive terminals are not available for {self.name} environments; "
                "run a command instead: `vendetta workspace connect NAME -- CMD ...`"
            )
        with self._running(workspace):
            return await self._attach(workspace, argv, rows=rows, cols=cols, env=env)

    async def pipe(
        self, workspace: str, argv: Sequence[str], env: Mapping[str, str] | None = None
    ) -> Terminal:
        """argv with stdin, stdout and stderr on pipes (no terminal): what is written
        reaches its stdin, until ``close_stdin``. Where ``capabilities.stdin`` is
        False the command gets no input (as with ``exec``)."""
        validate_name("workspace", workspace)
        check_command("a command", argv, env)
        with self._running(workspace):
            if self.capabilities.stdin:
                return await self._pipe(workspace, argv, env)
            return await self._without_stdin(workspace, argv, env)

    async def _without_stdin(
        self, workspace: str, argv: Sequence[str], env: Mapping[str, str] | None
    ) -> Terminal:
        """argv through ``exec``: no input, what is written is dropped."""
        output = self.exec(workspace, argv, env)
        # Its first chunk now: an error in starting it is the caller's, not the output's.
        return _NoStdin(await anext(aiter(output)), output)

    async def images(self) -> builtins.list[ImageInfo]:
        """The images on the engine that environments can be made from, sorted by name."""
        return sorted(await self._images(), key=lambda image: image.name)

    async def import_image(self, name: str, files: Mapping[str, Path]) -> builtins.list[ImageInfo]:
        """Import an image from files on this node (file name -> path; what each engine
        takes: ``image_formats``), named ``name`` ("" where the files name it: Docker).
        A file that is not what the engine takes is refused and nothing is imported.
        Returns the images the import made or named."""
        check_image_import(self.name, name, files, needs_name=self.import_needs_name)
        return await self._import_image(name, files)

    async def copy_source_in(
        self, workspace: str, tar: Path, *, replace: bool, deleted: Sequence[str]
    ) -> bool:
        """Where the environment holds a copy of its source (not the node's folder itself)
        and runs: bring an upload that just changed the node's folder in too (``tar``
        over the workdir, after removing ``deleted``, or everything else when
        ``replace``). Whether it did (False: mounted, not running, or not copied yet)."""
        validate_name("workspace", workspace)
        return await self._copy_source_in(workspace, tar, replace, deleted)

    async def copy_source_out(self, workspace: str, tar: Path) -> bool:
        """Where the environment holds a copy of its source and runs: write a tar of its
        workdir to ``tar`` (for the node's folder to catch up). Whether it did."""
        validate_name("workspace", workspace)
        return await self._copy_source_out(workspace, tar)

    async def close(self) -> None:
        """Release SDK clients."""

    # -- the engine's hooks: arguments already checked ---------------------------

    @abc.abstractmethod
    async def _create(self, spec: EnvironmentSpec) -> EnvironmentStatus:
        """Create it (nothing of this workspace exists yet); race losers raise
        AlreadyExistsError."""

    @abc.abstractmethod
    async def _start(self, workspace: str) -> EnvironmentStatus: ...

    @abc.abstractmethod
    async def _stop(self, workspace: str, timeout: float) -> EnvironmentStatus: ...

    @abc.abstractmethod
    async def _destroy(self, workspace: str) -> None: ...

    @abc.abstractmethod
    async def _inspect(self, workspace: str) -> EnvironmentStatus: ...

    @abc.abstractmethod
    async def _list(self) -> builtins.list[EnvironmentStatus]: ...

    @abc.abstractmethod
    def _exec(
        self, workspace: str, argv: Sequence[str], env: Mapping[str, str] | None, workdir: str
    ) -> AsyncGenerator[ExecChunk, None]:
        """Output chunks, then one with the exit code; NotRunningError when stopped."""

    async def _run(
        self, workspace: str, argv: Sequence[str], env: Mapping[str, str] | None, workdir: str
    ) -> tuple[int, bytes, bytes]:
        """By default the exec stream, collected; an engine may do better (LXD does)."""
        out, err, code = bytearray(), bytearray(), -1
        async with contextlib.aclosing(self._exec(workspace, argv, env, workdir)) as chunks:
            async for chunk in chunks:
                out += chunk.stdout
                err += chunk.stderr
                if chunk.exit_code is not None:
                    code = chunk.exit_code
        return code, bytes(out), bytes(err)

    @abc.abstractmethod
    def _logs(
        self, workspace: str, *, follow: bool, tail: int | None, since_unix_nano: int
    ) -> AsyncGenerator[LogRecord, None]: ...

    async def _log_batches(
        self, workspace: str, *, follow: bool, tail: int | None, since_unix_nano: int
    ) -> AsyncGenerator[builtins.list[LogRecord], None]:
        """_logs' records in batches of what has arrived; a provider whose engine hands
        over many lines at once overrides this (and reads _logs from it)."""
        records = self._logs(workspace, follow=follow, tail=tail, since_unix_nano=since_unix_nano)
        async for batch in batched(records, size=lambda r: len(r.text) + 32):
            yield batch

    async def _attach(
        self,
        workspace: str,
        argv: Sequence[str],
        *,
        rows: int,
        cols: int,
        env: Mapping[str, str] | None,
    ) -> Terminal:
        """Only called where ``capabilities.terminal``."""
        raise NotImplementedError

    async def _pipe(
        self, workspace: str, argv: Sequence[str], env: Mapping[str, str] | None
    ) -> Terminal:
        """Only called where ``capabilities.stdin``."""
        raise NotImplementedError

    async def _copy_source_in(
        self, workspace: str, tar: Path, replace: bool, deleted: Sequence[str]
    ) -> bool:
        """Engines that mount the node's folder have nothing to copy."""
        return False

    async def _copy_source_out(self, workspace: str, tar: Path) -> bool:
        return False

    async def _images(self) -> builtins.list[ImageInfo]:
        raise FailedPreconditionError(f"the {self.name} provider does not list images")

    async def _import_image(self, name: str, files: Mapping[str, Path]) -> builtins.list[ImageInfo]:
        """Files checked to exist; the engine checks their kind and leaves nothing
        half-imported when it refuses or fails."""
        raise FailedPreconditionError(f"the {self.name} provider does not import images")


def _check_logs(workspace: str, tail: int | None, since_unix_nano: int) -> None:
    validate_name("workspace", workspace)
    if tail is not None and tail < 0:
        raise InvalidArgumentError(f"tail must be 0 or more, got {tail}")
    if since_unix_nano < 0:
        raise InvalidArgumentError(f"since must be 0 or more, got {since_unix_nano}")
