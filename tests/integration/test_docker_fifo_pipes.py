"""Docker commands on pipes through FIFOs in the container's IO folder
(providers/docker/fifo_pipes.py), against the real engine: the bytes, the
separate streams and the exit code as through the exec stream, the FIFOs gone
once opened, and the stream where the FIFOs cannot be used."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from providers.base import EnvironmentSpec, Terminal
from providers.docker import DockerProvider
from providers.docker.fifo_pipes import IO_MOUNT, STALE_AFTER, FifoTerminal

pytestmark = pytest.mark.docker

IMAGE = os.environ.get("VENDETTA_TEST_IMAGE", "vendetta/busybox:latest")
# Where the command's stdin comes from, as the kernel names it.
STDIN_OF = "readlink /proc/$$/fd/0"


@pytest.fixture
async def provider(docker_engine: None, tmp_path: Path) -> AsyncIterator[DockerProvider]:
    provider = DockerProvider(agent_id=uuid.uuid4().hex, io_root=tmp_path / "io")
    yield provider
    for status in await provider.list():
        await provider.destroy(status.workspace)
    await provider.close()


async def _started(provider: DockerProvider, user: str = "") -> tuple[str, Path]:
    ws = f"t-{uuid.uuid4().hex[:12]}"
    await provider.create(EnvironmentSpec(workspace=ws, image=IMAGE, user=user))
    await provider.start(ws)
    folder = provider._io_root / provider.container_name(ws)  # type: ignore[operator]
    return ws, folder


async def _run(terminal: Terminal, data: bytes = b"") -> tuple[bytes, bytes, int | None]:
    out, err, code = b"", b"", None

    async def feed() -> None:
        for i in range(0, len(data), 65536):
            await terminal.write(data[i : i + 65536])
        await terminal.close_stdin()

    feeding = asyncio.create_task(feed())
    async for chunk in terminal.output():
        out += chunk.stdout
        err += chunk.stderr
        if chunk.exit_code is not None:
            code = chunk.exit_code
    await asyncio.wait_for(feeding, 30)
    await terminal.close()
    return out, err, code


async def test_a_command_on_fifos_with_its_streams_apart_and_nothing_left(
    provider: DockerProvider,
) -> None:
    ws, folder = await _started(provider)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o711  # no listing by the container's users
    data = bytes(range(256)) * 4096 * 4  # 4 MiB, more than a pipe holds
    terminal = await provider.pipe(ws, ["sh", "-c", f"{STDIN_OF}; wc -c; echo done >&2; exit 4"])
    assert isinstance(terminal, FifoTerminal)
    out, err, code = await asyncio.wait_for(_run(terminal, data), 60)
    source, count = out.decode().replace(" (deleted)", "").split()  # removed once both held it
    assert source.startswith(f"{IO_MOUNT}/") and source.endswith(".i")
    assert (int(count), err, code) == (len(data), b"done\n", 4)
    await provider._spares.settle()  # the next command's shell, started meanwhile
    assert list(folder.iterdir()) == []  # each FIFO removed once both ends held it
    await provider.destroy(ws)
    assert not folder.exists()


async def test_fifos_a_killed_agent_left_are_removed_by_the_next_open(
    provider: DockerProvider,
) -> None:
    ws, folder = await _started(provider)
    left = folder / f"{'a' * 32}.i"  # an agent killed between making and opening
    os.mkfifo(left, 0o666)
    old = time.time() - STALE_AFTER - 1
    os.utime(left, (old, old))
    fresh = folder / f"{'b' * 32}.i"  # another open still under way: kept
    os.mkfifo(fresh, 0o666)
    terminal = await provider.pipe(ws, ["true"])
    assert isinstance(terminal, FifoTerminal)
    assert await asyncio.wait_for(_run(terminal), 60) == (b"", b"", 0)
    await provider._spares.settle()
    assert list(folder.iterdir()) == [fresh]


async def test_the_next_command_becomes_the_spare_shell_started_ahead(
    provider: DockerProvider,
) -> None:
    """providers/docker/spares.py: once a command has ended (whatever else still
    runs), the next one's shell is started in the background; the next command
    becomes it, its argv, environment, input, streams and exit code as a command
    of its own has them. A spare whose shell ended is not handed out, and a stop
    drops the spare."""
    ws, _ = await _started(provider)
    held = await provider.pipe(ws, ["cat"])  # a long one (a relay, say), open throughout
    first = await provider.pipe(ws, ["true"])
    assert await asyncio.wait_for(_run(first), 60) == (b"", b"", 0)
    await provider._spares.settle()
    _, spare = provider._spares._spares[ws]
    odd = "a b\nc'd $HOME \\"  # a space, a newline, a quote, no expansion, a backslash
    data = os.urandom(1 << 20)
    script = 'printf "%s|%s|" "$1" "$V"; wc -c; echo err >&2; exit 3'
    second = await provider.pipe(ws, ["sh", "-c", script, "sh", odd], {"V": odd})
    assert second is spare.terminal
    out, err, code = await asyncio.wait_for(_run(second, data), 60)
    head, _, count = out.decode().rpartition("|")
    assert (head, int(count), err, code) == (f"{odd}|{odd}", len(data), b"err\n", 3)
    # The next spare's shell killed: the command after it starts its own.
    await provider._spares.settle()
    _, spare = provider._spares._spares[ws]
    exec_id = spare.terminal._exec_id
    pid = (await provider._engine.call("t", lambda api: api.exec_inspect(exec_id)))["Pid"]
    os.kill(pid, signal.SIGKILL)
    third = await provider.pipe(ws, ["echo", "own"])
    assert third is not spare.terminal
    assert await asyncio.wait_for(_run(third), 60) == (b"own\n", b"", 0)
    await provider._spares.settle()
    assert await asyncio.wait_for(_run(held, b"still here"), 60) == (b"still here", b"", 0)
    await provider._spares.settle()
    await provider.stop(ws)
    assert ws not in provider._spares._spares


async def test_large_output_input_left_unread_and_a_missing_command(
    provider: DockerProvider,
) -> None:
    ws, _ = await _started(provider)
    big = await provider.pipe(ws, ["sh", "-c", "head -c 20000000 /dev/zero; echo end >&2"])
    out, err, code = await asyncio.wait_for(_run(big), 60)
    assert (len(out), out.count(0), err, code) == (20_000_000, 20_000_000, b"end\n", 0)
    # The command reads 10 bytes and ends: the rest of the input is dropped, no hang.
    short = await provider.pipe(ws, ["head", "-c", "10"])
    assert await asyncio.wait_for(_run(short, b"x" * (8 << 20)), 60) == (b"x" * 10, b"", 0)
    missing = await provider.pipe(ws, ["no-such-command"])
    out, err, code = await asyncio.wait_for(_run(missing), 60)
    assert (out, code) == (b"", 127) and b"no-such-command" in err


async def test_a_user_other_than_root_opens_them(provider: DockerProvider) -> None:
    ws, _ = await _started(provider, user="65534:65534")
    terminal = await provider.pipe(ws, ["sh", "-c", f"id -u; {STDIN_OF}; cat"])
    out, _, code = await asyncio.wait_for(_run(terminal, b"hello\n"), 60)
    uid, source, echoed = out.decode().replace(" (deleted)", "").splitlines()
    assert (uid, code, echoed) == ("65534", 0, "hello")
    assert source.startswith(f"{IO_MOUNT}/")


async def test_the_stream_where_the_fifos_cannot_be_used(provider: DockerProvider) -> None:
    ws, folder = await _started(provider, user="65534:65534")
    folder.chmod(0o700)  # the container's user cannot reach the FIFOs: its shell fails
    terminal = await provider.pipe(ws, ["sh", "-c", f"{STDIN_OF}; cat"])
    assert not isinstance(terminal, FifoTerminal)
    out, _, code = await asyncio.wait_for(_run(terminal, b"in\n"), 60)
    source, echoed = out.decode().splitlines()
    assert (source.startswith("pipe:"), echoed, code) == (True, "in", 0)
    assert list(folder.iterdir()) == []  # the FIFOs of the try are gone too
    folder.rmdir()  # a container made before the IO folder existed (or it went)
    terminal = await provider.pipe(ws, ["sh", "-c", STDIN_OF])
    assert not isinstance(terminal, FifoTerminal)
    out, _, code = await asyncio.wait_for(_run(terminal), 60)
    assert out.startswith(b"pipe:") and code == 0
