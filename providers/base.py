"""The one async provider interface, its plain data types and capability flags."""

from __future__ import annotations

import abc
import enum
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

# Labels (or their equivalent) every provider puts on what it creates, so an
# agent finds its own environments again after a restart.
LABEL_MANAGED = "vendetta.managed"
LABEL_AGENT = "vendetta.agent"
LABEL_WORKSPACE = "vendetta.workspace"


class EnvState(enum.Enum):
    ABSENT = "absent"
    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Capabilities:
    """What differs between providers; callers branch on these, never on names."""

    exec: bool = True
    follow_logs: bool = True
    resource_limits: bool = False
    virtual_machine: bool = False
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


def check_env(env: Mapping[str, str]) -> None:
    """Variable names an exec or terminal may set (no '=', no NUL, not empty)."""
    from common.errors import InvalidArgumentError

    for key in env:
        if not key or "=" in key or "\0" in key:
            raise InvalidArgumentError(f"invalid environment variable name {key!r}")


class Provider(abc.ABC):
    """Drives one engine on the local node. Every method keeps SDK calls off the loop."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]

    def __init__(self, agent_id: str) -> None:
        # Environments are labelled with the agent's id: two agents sharing one
        # engine (two nodes on one host) never touch each other's.
        self.agent_id = agent_id

    @abc.abstractmethod
    async def readiness(self) -> Readiness: ...

    @abc.abstractmethod
    async def create(self, spec: EnvironmentSpec) -> EnvironmentStatus:
        """Create the environment, stopped. AlreadyExistsError if it exists."""

    @abc.abstractmethod
    async def start(self, workspace: str) -> EnvironmentStatus:
        """Start it; a running environment is left as it is."""

    @abc.abstractmethod
    async def stop(self, workspace: str, timeout: float = 10.0) -> EnvironmentStatus:
        """Stop gracefully, forcing after ``timeout``; a stopped one is left as it is."""

    @abc.abstractmethod
    async def destroy(self, workspace: str) -> None:
        """Remove it and everything it owns; absent is not an error."""

    @abc.abstractmethod
    async def inspect(self, workspace: str) -> EnvironmentStatus:
        """State of one environment; state ABSENT when it does not exist."""

    @abc.abstractmethod
    async def list(self) -> list[EnvironmentStatus]:
        """Every environment this agent owns on the engine."""

    @abc.abstractmethod
    def exec(
        self,
        workspace: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        workdir: str = "",
    ) -> AsyncIterator[ExecChunk]:
        """Run argv (no shell) inside; yield output, then one chunk with exit_code."""

    async def run(
        self,
        workspace: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        workdir: str = "",
    ) -> tuple[int, bytes, bytes]:
        """Run argv to completion: (exit code, stdout, stderr), for output wanted whole.

        An engine may do this more reliably than a stream (LXD does).
        """
        out, err, code = bytearray(), bytearray(), -1
        async for chunk in self.exec(workspace, argv, env, workdir):
            out += chunk.stdout
            err += chunk.stderr
            if chunk.exit_code is not None:
                code = chunk.exit_code
        return code, bytes(out), bytes(err)

    @abc.abstractmethod
    def logs(
        self, workspace: str, *, follow: bool, tail: int | None, since_unix_nano: int = 0
    ) -> AsyncIterator[LogRecord]:
        """The environment's own output; with follow, until it stops or the caller cancels."""

    def missing(self, workspace: str) -> Exception:
        """The error for a workspace that has no environment of this provider here."""
        from common.errors import NotFoundError

        return NotFoundError(
            f"workspace {workspace!r} has no {self.name} environment on this node: create "
            f"it with `vendetta workspace create {workspace}`, then `vendetta workspace up`"
        )

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
        from common.errors import FailedPreconditionError

        raise FailedPreconditionError(
            f"interactive terminals are not available for {self.name} environments yet; "
            "run a command instead: `vendetta workspace connect NAME -- CMD ...`"
        )

    async def pipe(
        self, workspace: str, argv: Sequence[str], env: Mapping[str, str] | None = None
    ) -> Terminal:
        """argv with stdin, stdout and stderr on pipes (no terminal): what is written
        reaches its stdin, until ``close_stdin``. Where ``capabilities.stdin`` is
        False the command gets no input (as with ``exec``)."""
        output = self.exec(workspace, argv, env)
        # Its first chunk now: an error in starting it is the caller's, not the output's.
        return _NoStdin(await anext(aiter(output)), output)

    async def close(self) -> None:
        """Release SDK clients."""
