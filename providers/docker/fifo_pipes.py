"""Commands without a terminal (scp's sftp-server, rsync, git: `Provider.pipe`)
whose stdin, stdout and stderr are FIFOs in a folder of the node bind-mounted
into the container at IO_MOUNT, instead of Docker's exec stream. The bytes go
between the agent and the command through the kernel: dockerd and
containerd-shim, which copy and frame each chunk of the stream (1.65 s of their
CPU per 400 MB scp'd into a workspace, docs/performance.md), leave the path.
Docker still starts the command (a detached exec) and says its exit code.

The FIFOs are made for one command under a random name, opened by both sides,
then removed. FIFOs an agent killed in that moment left behind are removed by
the next command's open, once older than any open may take (STALE_AFTER).
The folder is the agent's (0711 in a 0700 agent folder on the node, so no other
user of the node reaches it); the FIFOs are 0666 so that whichever user the
container runs as may open them.

`open_fifo_pipe` gives None where this cannot be used (a container made before
the mount existed, an image without /bin/sh, a command that did not open its
FIFOs in time): the caller then opens the exec stream, no input lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import secrets
import shlex
import stat
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from common.pipes import widen
from providers.base import ExecChunk, Terminal
from providers.docker import execs
from providers.docker.containers import Info
from providers.threaded import EngineClient

IO_MOUNT = "/run/vendetta"

# The shell inside opens the three FIFOs, says so with one byte on stdout, then
# becomes the command, argv as given ("$@"; looked up in PATH as Docker's exec does).
SCRIPT = 'f=$1; shift; exec <"$f.i" >"$f.o" 2>"$f.e" && printf R && exec "$@"'
READY = b"R"
# A spare (providers/docker/spares.py): the shell opens its FIFOs as SCRIPT does,
# then reads the command it is to become as lines of shell, up to a line "$2",
# and runs them. Its `read` takes one byte at a time, so the command's input,
# which follows, stays for it.
SPARE_SCRIPT = (
    'f=$1; exec <"$f.i" >"$f.o" 2>"$f.e" && printf R || exit 126; s=; '
    'while IFS= read -r l; do [ "$l" = "$2" ] && break; s="$s$l\n"; done; eval "$s"'
)
# What a spare may be given in its environment: names its shell can export.
_SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# How long the shell may take to open its FIFOs (a busy node) before the stream is used.
OPEN_TIMEOUT = 10.0
# A FIFO this old was left by an agent killed while a command opened it: every
# open ends (and removes its FIFOs) within OPEN_TIMEOUT.
STALE_AFTER = 6 * OPEN_TIMEOUT
CHUNK = 256 * 1024
# A chunk in one write. Not more: a pipe's pages count against the node user's
# pipe-user-pages-soft (64 MiB), past which every new pipe of theirs gets one page.
FIFO_SIZE = CHUNK
_OPEN_FLAGS = os.O_NONBLOCK | os.O_CLOEXEC


def io_folder(info: Info) -> Path | None:
    """The node's folder behind the container's IO_MOUNT, where it has one and it is
    this process's to make FIFOs in."""
    for mount in info.get("Mounts") or []:
        if mount.get("Destination") != IO_MOUNT or mount.get("Type") != "bind":
            continue
        path = Path(str(mount.get("Source") or ""))
        try:
            st = path.stat()
        except OSError:
            return None
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid():
            return path
    return None


def make_io_folder(root: Path, container: str) -> Path:
    """The folder to bind-mount at IO_MOUNT for ``container``: traversable by the
    container's users, listable by none."""
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    folder = root / container
    folder.mkdir(exist_ok=True)
    folder.chmod(0o711)
    return folder


async def open_fifo_pipe(
    engine: EngineClient[Any],
    container_id: str,
    folder: Path,
    argv: Sequence[str],
    env: Mapping[str, str] | None,
    *,
    action: str,
) -> FifoTerminal | None:
    """argv started in the container on FIFOs in ``folder``; None where it did not
    open them (the caller uses the stream)."""
    return await _open(
        engine, container_id, folder, lambda inside: [SCRIPT, "sh", inside, *argv], env, action
    )


class Spare:
    """A shell started ahead on its FIFOs, to become a command when one is asked for:
    Docker's exec start (50 ms of runc here) is then behind, not in, a session's
    start."""

    def __init__(self, terminal: FifoTerminal, end: str) -> None:
        self.terminal = terminal
        self._end = end

    async def take(self, argv: Sequence[str], env: Mapping[str, str] | None) -> FifoTerminal | None:
        """The spare become argv with env (looked up in PATH, as Docker's exec does);
        None where it cannot be (it ended, or env has a name no shell exports)."""
        env = env or {}
        if not all(_SHELL_NAME.fullmatch(k) for k in env) or not await self.terminal.running():
            return None
        lines = [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
        lines += [f"exec {shlex.join(argv)}", self._end]
        await self.terminal.write(("\n".join(lines) + "\n").encode())
        return self.terminal


async def open_spare(
    engine: EngineClient[Any], container_id: str, folder: Path, *, action: str
) -> Spare | None:
    """A Spare in the container on FIFOs in ``folder``; None where it did not open them."""
    end = secrets.token_hex(16)
    terminal = await _open(
        engine, container_id, folder, lambda inside: [SPARE_SCRIPT, "sh", inside, end], None, action
    )
    return Spare(terminal, end) if terminal is not None else None


async def _open(
    engine: EngineClient[Any],
    container_id: str,
    folder: Path,
    script: Callable[[str], list[str]],
    env: Mapping[str, str] | None,
    action: str,
) -> FifoTerminal | None:
    """`/bin/sh -c` with ``script(the FIFOs' path inside)`` on new FIFOs in ``folder``."""
    _sweep(folder)
    token = secrets.token_hex(16)
    paths = [folder / f"{token}.{end}" for end in "ioe"]
    held: list[int] = []  # O_RDWR: never waits for the other end, nor sees its end of file
    try:
        for path in paths:
            os.mkfifo(path, 0o600)
            path.chmod(0o666)
            held.append(os.open(path, os.O_RDWR | _OPEN_FLAGS))
        for fd in held[:2]:  # stdin and stdout carry the bulk; stderr keeps the default
            widen(fd, FIFO_SIZE)
        shell = ["/bin/sh", "-c", *script(f"{IO_MOUNT}/{token}")]
        exec_id = await engine.call(
            action, lambda api: execs.create_exec(api, container_id, shell, env)
        )
        await engine.call(action, lambda api: api.exec_start(exec_id, detach=True))
        if not await _opened(engine, exec_id, held[1], action):
            return None
        # The command holds its ends now: ours become plain ones, so that each side
        # sees the other's end of file.
        stdin = os.open(paths[0], os.O_WRONLY | _OPEN_FLAGS)
        stdout = os.open(paths[1], os.O_RDONLY | _OPEN_FLAGS)
        stderr = os.open(paths[2], os.O_RDONLY | _OPEN_FLAGS)
        terminal = FifoTerminal(engine, exec_id, action)
        await terminal.connect(stdin, stdout, stderr)
        return terminal
    finally:
        # Names first: a shell that had not opened them yet fails at once, where after
        # our ends closed it would wait in open() for a writer that never comes.
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        for fd in held:
            os.close(fd)


def _sweep(folder: Path) -> None:
    """Remove FIFOs in ``folder`` older than STALE_AFTER (a killed agent's)."""
    cutoff = time.time() - STALE_AFTER
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISFIFO(st.st_mode) and st.st_mtime < cutoff:
                    os.unlink(entry.path)


async def _opened(engine: EngineClient[Any], exec_id: str, fd: int, action: str) -> bool:
    """Whether the shell said READY on ``fd`` before it ended or OPEN_TIMEOUT passed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + OPEN_TIMEOUT
    delay = 0.005
    readable = asyncio.Event()
    loop.add_reader(fd, readable.set)
    try:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(readable.wait(), delay)
            readable.clear()
            with contextlib.suppress(BlockingIOError):
                return os.read(fd, 1) == READY
            # READY comes before the command starts: a shell that ended without it failed.
            state = await engine.call(action, lambda api: api.exec_inspect(exec_id))
            if not state.get("Running"):
                with contextlib.suppress(BlockingIOError):
                    return os.read(fd, 1) == READY
                return False
            if loop.time() > deadline:
                return False
            delay = min(delay * 2, 0.2)
    finally:
        loop.remove_reader(fd)


def _same(protocol: asyncio.StreamReaderProtocol) -> asyncio.StreamReaderProtocol:
    return protocol


class _Sink(asyncio.Protocol):
    """The command's stdin: writes wait while the FIFO is full; once it has closed
    (the command ended) the rest is dropped, as the stream drops it."""

    def __init__(self) -> None:
        self.transport: asyncio.WriteTransport | None = None
        self.gone = False
        self._room = asyncio.Event()
        self._room.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def pause_writing(self) -> None:
        self._room.clear()

    def resume_writing(self) -> None:
        self._room.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        self._room.set()

    async def write(self, data: bytes) -> None:
        if self.gone or self.transport is None or self.transport.is_closing():
            return
        self.transport.write(data)
        await self._room.wait()


class FifoTerminal(Terminal):
    def __init__(self, engine: EngineClient[Any], exec_id: str, action: str) -> None:
        self._engine = engine
        self._exec_id = exec_id
        self._action = action
        self._sink = _Sink()
        self._readers: list[tuple[str, asyncio.StreamReader]] = []
        self._transports: list[asyncio.BaseTransport] = []
        # Called once, by close(): the session is over (providers/docker/spares.py).
        self.on_closed: Callable[[], None] | None = None

    async def connect(self, stdin: int, stdout: int, stderr: int) -> None:
        """Own the three descriptors (closed with this terminal)."""
        loop = asyncio.get_running_loop()
        files = [
            os.fdopen(stdin, "wb", buffering=0),
            os.fdopen(stdout, "rb", buffering=0),
            os.fdopen(stderr, "rb", buffering=0),
        ]
        try:
            sink, _ = await loop.connect_write_pipe(lambda: self._sink, files[0])
            self._transports.append(sink)
            for kind, file in (("stdout", files[1]), ("stderr", files[2])):
                reader = asyncio.StreamReader(limit=CHUNK)
                protocol = asyncio.StreamReaderProtocol(reader)
                source, _ = await loop.connect_read_pipe(functools.partial(_same, protocol), file)
                self._transports.append(source)
                self._readers.append((kind, reader))
        except BaseException:
            for file in files:
                file.close()
            await self.close()
            raise

    async def output(self) -> AsyncIterator[ExecChunk]:
        reads: dict[asyncio.Future[bytes], tuple[str, asyncio.StreamReader]] = {
            asyncio.ensure_future(reader.read(CHUNK)): (kind, reader)
            for kind, reader in self._readers
        }
        try:
            while reads:
                done, _ = await asyncio.wait(reads, return_when=asyncio.FIRST_COMPLETED)
                for read in done:
                    kind, reader = reads.pop(read)
                    if data := read.result():
                        yield ExecChunk(stdout=data) if kind == "stdout" else ExecChunk(stderr=data)
                        reads[asyncio.ensure_future(reader.read(CHUNK))] = (kind, reader)
        finally:
            for read in reads:
                read.cancel()
        yield ExecChunk(exit_code=await execs.exit_code(self._engine, self._exec_id, self._action))

    async def write(self, data: bytes) -> None:
        await self._sink.write(data)

    async def running(self) -> bool:
        """Whether Docker says the command still runs."""
        exec_id = self._exec_id
        state = await self._engine.call(self._action, lambda api: api.exec_inspect(exec_id))
        return bool(state.get("Running"))

    async def close_stdin(self) -> None:
        if self._sink.transport is not None:
            self._sink.transport.close()  # after what it still holds: then end of file

    async def resize(self, rows: int, cols: int) -> None:
        pass  # no terminal

    async def close(self) -> None:
        """The command reads end of file and its writes fail: it ends, as with the stream."""
        on_closed, self.on_closed = self.on_closed, None
        if on_closed is not None:
            on_closed()
        for transport in self._transports:
            if isinstance(transport, asyncio.WriteTransport):
                # Not yet closed, or closing behind input the command never read.
                if not transport.is_closing() or transport.get_write_buffer_size():
                    transport.abort()
            else:
                transport.close()
