"""A provider whose environment is this machine: what the agent would run inside
runs here as a process with ``path`` as PATH (the relays of nodeagent/dial.py
and listen.py, each tool they may pick); `attach` runs it on a pseudo-terminal
of its own (util-linux's `setsid --ctty` makes it the controlling one, so a
resize reaches the command as SIGWINCH)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import pty
import struct
import termios
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


class _Pty(Terminal):
    def __init__(self, proc: asyncio.subprocess.Process, master: int) -> None:
        self.proc = proc
        self.master = master

    async def output(self) -> AsyncIterator[ExecChunk]:
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[bytes] = asyncio.Queue()

        def readable() -> None:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: the terminal's last holder closed it
                data = b""
            if not data:
                loop.remove_reader(self.master)
            chunks.put_nowait(data)

        loop.add_reader(self.master, readable)
        while data := await chunks.get():
            yield ExecChunk(stdout=data)
        yield ExecChunk(exit_code=await self.proc.wait())

    async def write(self, data: bytes) -> None:
        os.write(self.master, data)

    async def close_stdin(self) -> None:
        pass  # a terminal has no end of file of its own

    async def resize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    async def close(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        with contextlib.suppress(OSError):
            os.close(self.master)


class LocalPipes:
    """Runs what the agent would run inside as a process here, with ``path`` as PATH."""

    name = "local"
    capabilities = Capabilities(stdin=True, terminal=True)

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

    async def attach(
        self,
        workspace: str,
        argv: Sequence[str],
        *,
        rows: int,
        cols: int,
        env: Mapping[str, str] | None = None,
    ) -> Terminal:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        try:
            proc = await asyncio.create_subprocess_exec(
                "setsid", "--ctty", *argv,
                stdin=slave, stdout=slave, stderr=slave,
                env={"PATH": os.environ["PATH"], **(env or {})},
            )  # fmt: skip
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        return _Pty(proc, master)
