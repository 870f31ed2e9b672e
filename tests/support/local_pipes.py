"""A provider whose environment is this machine: what the agent would run inside
runs here as a process with ``path`` as PATH (the relays of nodeagent/dial.py
and listen.py, each tool they may pick)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence

from providers.base import Capabilities, EnvironmentStatus, EnvState, ExecChunk, Terminal


class _Process(Terminal):
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def output(self) -> AsyncIterator[ExecChunk]:
        assert self.proc.stdout is not None and self.proc.stderr is not None
        err = asyncio.create_task(self.proc.stderr.read())
        while data := await self.proc.stdout.read(65536):
            yield ExecChunk(stdout=data)
        yield ExecChunk(stderr=await err, exit_code=await self.proc.wait())

    async def write(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        await self.proc.stdin.drain()

    async def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        if not self.proc.stdin.is_closing():
            self.proc.stdin.close()

    async def resize(self, rows: int, cols: int) -> None:
        pass

    async def close(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


class LocalPipes:
    """Runs what the agent would run inside as a process here, with ``path`` as PATH."""

    name = "local"
    capabilities = Capabilities(stdin=True)

    def __init__(self, path: str, addresses: tuple[str, ...] = ()) -> None:
        self.path = path
        self.addresses = addresses  # the environment's own, for Dial's direct path
        self.ports: dict[int, str] = {}  # published: port inside -> where on the node

    async def inspect(self, workspace: str) -> EnvironmentStatus:
        return EnvironmentStatus(
            workspace, self.name, EnvState.RUNNING, addresses=self.addresses, ports=self.ports
        )

    def get(self, name: str) -> LocalPipes:
        return self

    async def pipe(
        self, workspace: str, argv: Sequence[str], env: Mapping[str, str] | None = None
    ) -> Terminal:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={"PATH": self.path, **(env or {})},
        )
        return _Process(proc)
