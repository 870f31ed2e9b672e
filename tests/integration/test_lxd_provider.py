"""LxdProvider driven directly against the real LXD daemon (no gRPC, no fakes).

Needs a running, initialised LXD and the test image (``VENDETTA_LXD_TEST_IMAGE``,
default ``vendetta/busybox``, imported offline by scripts/engine-lxd.sh); the
``lxd_engine`` fixture of tests/conftest.py skips these tests without them, and
fails them when ``CI`` is set. Every test uses its own agent id and workspace
names, and removes what it created.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pylxd
import pytest

from common.errors import (
    AlreadyExistsError,
    EngineUnavailableError,
    FailedPreconditionError,
    ImageNotFoundError,
)
from providers.base import EnvironmentSpec, EnvState, LogRecord, Terminal
from providers.lxd import LxdProvider, ports
from providers.lxd.command import CommandLogParser
from providers.lxd.provider import KEY_AGENT, KEY_MANAGED, KEY_WORKSPACE
from providers.lxd.websocket import THREAD_PREFIX
from tests.conftest import LXD_TEST_IMAGE
from tests.support.squat import try_bind

pytestmark = pytest.mark.lxd

IMAGE = LXD_TEST_IMAGE
WAIT = 20.0

MakeProvider = Callable[[], LxdProvider]


@pytest.fixture
async def make_provider(lxd_engine: None) -> AsyncIterator[MakeProvider]:
    """Providers with fresh agent ids; everything they own is destroyed afterwards."""
    providers: list[LxdProvider] = []

    def make() -> LxdProvider:
        provider = LxdProvider(agent_id=uuid.uuid4().hex)
        providers.append(provider)
        return provider

    yield make
    for provider in providers:
        for status in await provider.list():
            await provider.destroy(status.workspace)
        assert await provider.list() == []
        await provider.close()


@pytest.fixture
async def provider(make_provider: MakeProvider) -> LxdProvider:
    return make_provider()


@pytest.fixture
def workspace() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def running(provider: LxdProvider, workspace: str) -> str:
    await provider.create(
        EnvironmentSpec(workspace=workspace, image=IMAGE, env={"SPEC_VAR": "from-spec"})
    )
    status = await provider.start(workspace)
    assert status.state is EnvState.RUNNING
    return workspace


async def run(
    provider: LxdProvider,
    workspace: str,
    argv: list[str],
    env: dict[str, str] | None = None,
    workdir: str = "",
) -> tuple[bytes, bytes, int]:
    stdout = stderr = b""
    exit_code: int | None = None
    async for chunk in provider.exec(workspace, argv, env=env, workdir=workdir):
        assert exit_code is None, "no chunk may follow the one with the exit code"
        stdout += chunk.stdout
        stderr += chunk.stderr
        if chunk.exit_code is not None:
            assert chunk.stdout == chunk.stderr == b""
            exit_code = chunk.exit_code
    assert exit_code is not None, "exec must end with an exit code"
    return stdout, stderr, exit_code


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {WAIT:g}s waiting for {what}")
        await asyncio.sleep(0.1)


def instance_devices(name: str) -> dict[str, dict[str, str]]:
    return dict(pylxd.Client().instances.get(name).devices)


async def collect(provider: LxdProvider, workspace: str, **kw: object) -> list[LogRecord]:
    return [r async for r in provider.logs(workspace, **kw)]  # type: ignore[arg-type]


# -- readiness and errors ----------------------------------------------------------


async def test_readiness_reports_daemon_and_images(provider: LxdProvider) -> None:
    readiness = await provider.readiness()
    assert readiness.ready, readiness.detail
    assert readiness.version and "LXD" in readiness.detail
    assert IMAGE in readiness.images


async def test_unreachable_daemon_is_not_ready_and_create_fails() -> None:
    provider = LxdProvider(uuid.uuid4().hex, endpoint="http://127.0.0.1:9")
    readiness = await provider.readiness()
    assert not readiness.ready
    assert "LXD daemon not reachable" in readiness.detail
    assert "engine-lxd.sh" in readiness.detail
    with pytest.raises(EngineUnavailableError):
        await provider.create(EnvironmentSpec(workspace="x", image=IMAGE))


async def test_instance_names_are_valid_hostnames(provider: LxdProvider) -> None:
    long = "a" + "-b" * 31  # 63 characters, the longest workspace name
    name = provider.instance_name(long)
    assert len(name) <= 63 and name.startswith("vd-a-b") and not name.endswith("-")
    assert name != provider.instance_name(long[:-2] + "-c")
    assert provider.instance_name("web") == f"vd-web-{provider.agent_id[:8]}"


async def test_missing_image_names_the_images_there(provider: LxdProvider, workspace: str) -> None:
    with pytest.raises(ImageNotFoundError) as missing:
        await provider.create(EnvironmentSpec(workspace=workspace, image="vendetta/absent"))
    assert "vendetta/absent" in missing.value.message
    assert IMAGE in missing.value.message  # what the node has instead
    assert (await provider.inspect(workspace)).state is EnvState.ABSENT


# -- lifecycle -----------------------------------------------------------------------


async def test_lifecycle_with_limits_and_config_keys(provider: LxdProvider, workspace: str) -> None:
    created = await provider.create(
        EnvironmentSpec(workspace=workspace, image=IMAGE, cpus=0.5, memory_bytes=64 << 20)
    )
    assert created.state is EnvState.CREATED and created.id == provider.instance_name(workspace)
    with pytest.raises(AlreadyExistsError):
        await provider.create(EnvironmentSpec(workspace=workspace, image=IMAGE))

    config = await asyncio.to_thread(lambda: pylxd.Client().instances.get(created.id).config)
    assert config[KEY_MANAGED] == "true"
    assert config[KEY_AGENT] == provider.agent_id
    assert config[KEY_WORKSPACE] == workspace
    assert config["limits.cpu"] == "1" and config["limits.cpu.allowance"] == "50ms/100ms"
    assert config["limits.memory"] == f"{64 << 20}B"

    assert (await provider.start(workspace)).state is EnvState.RUNNING
    assert (await provider.start(workspace)).state is EnvState.RUNNING
    assert [s.workspace for s in await provider.list()] == [workspace]
    began = time.monotonic()
    assert (await provider.stop(workspace, timeout=5)).state is EnvState.STOPPED
    assert time.monotonic() - began < 10
    assert (await provider.stop(workspace)).state is EnvState.STOPPED
    await provider.destroy(workspace)
    await provider.destroy(workspace)
    assert (await provider.inspect(workspace)).state is EnvState.ABSENT


async def test_stop_forces_after_the_timeout(provider: LxdProvider, running: str) -> None:
    # Make init ignore the graceful halt: only the forced stop can end it.
    _, _, code = await run(provider, running, ["sh", "-c", "kill -STOP 1"])
    assert code == 0
    began = time.monotonic()
    assert (await provider.stop(running, timeout=1)).state is EnvState.STOPPED
    assert time.monotonic() - began < 15


# -- exec ----------------------------------------------------------------------------


async def test_exec_reads_end_of_file_on_stdin_and_large_output(
    provider: LxdProvider, running: str
) -> None:
    # `cat` would wait for ever on a stdin left open.
    out, _, code = await asyncio.wait_for(run(provider, running, ["cat"]), WAIT)
    assert (out, code) == (b"", 0)
    out, _, code = await run(provider, running, ["sh", "-c", "head -c 3000000 /dev/zero"])
    assert (len(out), code) == (3_000_000, 0)


def lxd_threads(workspace: str) -> list[threading.Thread]:
    return [
        t
        for t in threading.enumerate()
        if t.name.startswith(THREAD_PREFIX) and t.name.endswith(f"-{workspace}") and t.is_alive()
    ]


async def test_leaving_an_exec_early_ends_its_readers(provider: LxdProvider, running: str) -> None:
    script = "echo started; while :; do echo tick-tock; sleep 0.2; done"
    stream = provider.exec(running, ["sh", "-c", script])
    first = await anext(stream)
    assert first.stdout.startswith(b"started\n")  # maybe with the first tick
    assert lxd_threads(running)  # the output readers
    await stream.aclose()
    assert not lxd_threads(running)
    # (The command itself may run on: LXD signals only the wrapper it started.)
    out, _, code = await run(provider, running, ["echo", "still fine"])
    assert (out, code) == (b"still fine\n", 0)


async def test_concurrent_runs_get_all_their_output(provider: LxdProvider, running: str) -> None:
    """What the supervisor does all the time. Over exec websockets LXD 5.0 lost the
    output of about 1 in 20 of these, and pylxd's ws4py failed 1 in 100 outright."""
    results = await asyncio.gather(
        *(
            provider.run(running, ["sh", "-c", f"echo {i}; echo e{i} >&2; exit {i % 3}"])
            for i in range(200)
        )
    )
    assert results == [(i % 3, f"{i}\n".encode(), f"e{i}\n".encode()) for i in range(200)]
    code, out, _ = await provider.run(running, ["cat"], env={"X": "1"}, workdir="/tmp")
    assert (code, out) == (0, b"")  # stdin at end-of-file
    with pytest.raises(FailedPreconditionError, match="vendetta workspace up"):
        await provider.stop(running, timeout=2)
        await provider.run(running, ["true"])


# -- logs ----------------------------------------------------------------------------


async def test_logs_of_the_command_and_console_tail_and_since(
    provider: LxdProvider, workspace: str
) -> None:
    script = "for i in 1 2 3 4 5; do echo line $i; done; echo warn >&2; exit 2"
    await provider.create(
        EnvironmentSpec(workspace=workspace, image=IMAGE, command=["sh", "-c", script])
    )
    assert await collect(provider, workspace, follow=False, tail=None) == []
    await provider.start(workspace)

    async def finished() -> bool:
        records = await collect(provider, workspace, follow=False, tail=None)
        return any(r.stream == "console" and "exited with code 2" in r.text for r in records)

    await eventually(finished, "the command to finish")
    records = await collect(provider, workspace, follow=False, tail=None)
    out = [r.text for r in records if r.stream == "stdout"]
    assert out == [f"line {i}" for i in range(1, 6)]
    assert ("stderr", "warn") in {(r.stream, r.text) for r in records}
    assert all(r.time_unix_nano > 0 for r in records)
    assert abs(records[0].time_unix_nano - time.time_ns()) < 60 * 10**9

    tail = await collect(provider, workspace, follow=False, tail=2)
    assert tail == records[-2:]
    assert await collect(provider, workspace, follow=False, tail=0) == []
    later = await collect(provider, workspace, follow=False, tail=None, since_unix_nano=2**62)
    assert later == []
    # The log lives in the container: still there when it is stopped.
    await provider.stop(workspace, timeout=2)
    stopped = await collect(provider, workspace, follow=False, tail=None)
    assert [r.text for r in stopped if r.stream == "stdout"] == out


async def test_logs_follow_gets_console_and_command_lines_and_ends_when_stopped(
    provider: LxdProvider, workspace: str
) -> None:
    await provider.create(
        EnvironmentSpec(
            workspace=workspace,
            image=IMAGE,
            command=["sh", "-c", "echo up; while :; do sleep 0.2; done"],
        )
    )
    await provider.start(workspace)
    seen: list[LogRecord] = []

    async def follow() -> None:
        async for record in provider.logs(workspace, follow=True, tail=None):
            seen.append(record)

    reader = asyncio.create_task(follow())
    await eventually(lambda: _has(seen, "stdout", "up"), "the command's first line")
    await run(provider, workspace, ["sh", "-c", "echo to-console > /proc/1/fd/1"])
    await eventually(lambda: _has(seen, "console", "to-console"), "the console line")
    await provider.stop(workspace, timeout=2)
    await asyncio.wait_for(reader, WAIT)


async def _has(records: list[LogRecord], stream: str, text: str) -> bool:
    return any(r.stream == stream and r.text == text for r in records)


async def test_cancelling_a_follow_ends_it(provider: LxdProvider, running: str) -> None:
    reader = asyncio.create_task(collect(provider, running, follow=True, tail=None))
    await asyncio.sleep(0.5)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader


def test_command_log_parser_maps_uptime_to_wall_time() -> None:
    parser = CommandLogParser()
    assert parser.parse("T 1700000000 100.00") is None
    out = parser.parse("O 101.50 hello world")
    err = parser.parse("E 102.00 oops")
    end = parser.parse("X 102.01 3")
    assert out == LogRecord(1_700_000_001_500_000_000, "stdout", "hello world")
    assert err == LogRecord(1_700_000_002_000_000_000, "stderr", "oops")
    assert end is not None and end.stream == "console" and "code 3" in end.text
    assert parser.parse("garbage") is None


# -- published ports -----------------------------------------------------------------

# A web server inside, as the environment's command (busybox httpd, in the foreground).
WEB = (
    "mkdir -p /www && echo hello-from-$(hostname) > /www/index.html "
    "&& exec httpd -f -p 8080 -h /www"
)


async def http_get(address: str) -> str:
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
        await writer.drain()
        return (await asyncio.wait_for(reader.read(), 5)).decode(errors="replace")
    finally:
        writer.close()


async def serves(address: str, text: str) -> None:
    async def check() -> bool:
        try:
            return text in await http_get(address)
        except OSError:
            return False

    await eventually(check, f"{text!r} from {address}")


async def squat(port: int) -> socket.socket:
    """Listen on ``port`` of the node's loopback, as another program would.

    LXD's forkproxy goes on listening for a moment after a stop returns: wait for it.
    """
    deadline = time.monotonic() + WAIT
    while (squatter := try_bind(port)) is None:
        if time.monotonic() > deadline:
            raise OSError(f"port {port} stayed taken")
        await asyncio.sleep(0.1)
    return squatter


def listening_on(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp has them) with a TCP listener on ``port``."""
    found = []
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(path).read_text().splitlines()[1:]:
            fields = line.split()
            address, _, hex_port = fields[1].partition(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:
                found.append(address)
    return found


async def test_published_ports_reach_a_server_inside(provider: LxdProvider, workspace: str) -> None:
    created = await provider.create(
        EnvironmentSpec(
            workspace=workspace, image=IMAGE, command=["sh", "-c", WEB], ports=(8080, 9090)
        )
    )
    assert created.ports == {}  # nothing listens while it is not running
    devices = await asyncio.to_thread(instance_devices, created.id)
    assert {n: d["connect"] for n, d in devices.items() if n.startswith("vd-port-")} == {
        "vd-port-8080": "tcp:127.0.0.1:8080",
        "vd-port-9090": "tcp:127.0.0.1:9090",
    }
    assert all(
        d["type"] == "proxy" and d["bind"] == "host" and d["listen"].startswith("tcp:127.0.0.1:")
        for n, d in devices.items()
        if n.startswith("vd-port-")
    )

    status = await provider.start(workspace)
    assert set(status.ports) == {8080, 9090}
    assert all(a.startswith("127.0.0.1:") for a in status.ports.values())
    await serves(status.ports[8080], f"hello-from-{created.id}")
    # Listening on the node's loopback only, nowhere else.
    node_port = int(status.ports[8080].rpartition(":")[2])
    assert listening_on(node_port) == ["0100007F"]
    # Nothing listens inside on 9090: its proxy takes a connection, then ends it unanswered.
    try:
        answer = await http_get(status.ports[9090])
    except OSError:
        answer = ""
    assert answer == ""
    assert (await provider.list())[0].ports == status.ports

    stopped = await provider.stop(workspace, timeout=2)
    assert stopped.ports == {}

    async def closed() -> bool:  # LXD's forkproxy exits shortly after the stop returns
        return listening_on(node_port) == []

    await eventually(closed, f"nothing listening on {node_port} after the stop")


async def test_a_node_port_taken_while_stopped_moves_at_start(
    provider: LxdProvider, workspace: str
) -> None:
    await provider.create(
        EnvironmentSpec(
            workspace=workspace, image=IMAGE, command=["sh", "-c", WEB], ports=(8080, 9090)
        )
    )
    first = await provider.start(workspace)
    await provider.stop(workspace, timeout=2)
    taken = int(first.ports[8080].rpartition(":")[2])
    with await squat(taken):
        again = await provider.start(workspace)
        assert again.state is EnvState.RUNNING
        assert set(again.ports) == {8080, 9090}
        assert again.ports[8080] != first.ports[8080]
        assert again.ports[9090] == first.ports[9090]  # still free: kept
        await serves(again.ports[8080], "hello-from-")


async def test_a_port_taken_between_check_and_start_is_retried(
    provider: LxdProvider, workspace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LXD's own refusal (a proxy that cannot listen) leads to fresh ports and a new start."""
    await provider.create(
        EnvironmentSpec(workspace=workspace, image=IMAGE, command=["sh", "-c", WEB], ports=(8080,))
    )
    first = await provider.start(workspace)
    await provider.stop(workspace, timeout=2)
    monkeypatch.setattr(ports, "is_free", lambda port: True)  # the check misses the squatter
    taken = int(first.ports[8080].rpartition(":")[2])
    with await squat(taken):
        again = await provider.start(workspace)
        assert again.ports[8080] != first.ports[8080]
        await serves(again.ports[8080], "hello-from-")


# -- terminals -----------------------------------------------------------------------


class Screen:
    """Everything a terminal printed so far, read in the background, and its exit code."""

    def __init__(self, terminal: Terminal) -> None:
        self.out = b""
        self.code: int | None = None
        self.task = asyncio.create_task(self._read(terminal))

    async def _read(self, terminal: Terminal) -> None:
        async for chunk in terminal.output():
            assert self.code is None, "no chunk may follow the one with the exit code"
            self.out += chunk.stdout
            if chunk.exit_code is not None:
                self.code = chunk.exit_code

    async def shows(self, text: str, within: float = WAIT) -> bool:
        deadline = time.monotonic() + within
        while text.encode() not in self.out:
            if self.task.done():
                self.task.result()
                pytest.fail(f"the terminal ended before {text!r}:\n{self.out.decode()}")
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True


async def test_terminal_types_resizes_and_returns_the_exit_code(
    provider: LxdProvider, running: str
) -> None:
    assert provider.capabilities.terminal
    terminal = await provider.attach(running, ["sh"], rows=30, cols=120, env={"EXTRA": "x"})
    screen = Screen(terminal)
    try:
        # Arithmetic, so the echo of what was typed never matches what is awaited.
        await terminal.write(b"echo hi-$((6*7)) $SPEC_VAR $EXTRA $TERM; stty size\n")
        assert await screen.shows("hi-42 from-spec x xterm"), screen.out
        assert await screen.shows("30 120"), screen.out
        await terminal.write(b"[ -t 0 ] && [ -t 1 ] && echo tty-$((2+3))\n")
        assert await screen.shows("tty-5"), screen.out  # stdin and stdout are a terminal
        await terminal.resize(20, 100)
        # The resize goes over the control websocket, the keys over the data one: they
        # may be handled in either order, so ask again until the new size shows.
        for _ in range(5):
            await terminal.write(b"stty size\n")
            if await screen.shows("20 100", within=2):
                break
        assert b"20 100" in screen.out
        await terminal.write(b"exit 3\n")
        await asyncio.wait_for(screen.task, WAIT)
        assert screen.code == 3
    finally:
        await terminal.close()


async def test_closing_a_terminal_hangs_up_its_command(provider: LxdProvider, running: str) -> None:
    terminal = await provider.attach(
        running,
        ["sh", "-c", "echo $$ > /tmp/tty.pid; echo ready-$((1+1)); exec sleep 600"],
        rows=24,
        cols=80,
    )
    screen = Screen(terminal)
    assert await screen.shows("ready-2"), screen.out
    screen.task.cancel()
    await asyncio.gather(screen.task, return_exceptions=True)
    await terminal.close()

    async def gone() -> bool:
        _, _, code = await run(provider, running, ["sh", "-c", "kill -0 $(cat /tmp/tty.pid)"])
        return code != 0

    await eventually(gone, "the terminal's command to end")
