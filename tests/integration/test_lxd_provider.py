"""LxdProvider driven directly against the real LXD daemon (no gRPC, no fakes).

Needs a running, initialised LXD and the test image (``VENDETTA_LXD_TEST_IMAGE``,
default ``vendetta/busybox``, imported offline by scripts/engine-lxd.sh); the
``lxd_engine`` fixture of tests/conftest.py skips these tests without them, and
fails them when ``CI`` is set. Every test uses its own agent id and workspace
names, and removes what it created.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pylxd
import pytest

from common.errors import (
    AlreadyExistsError,
    EngineUnavailableError,
    FailedPreconditionError,
    ImageNotFoundError,
    InvalidArgumentError,
    NotFoundError,
)
from providers.base import EnvironmentSpec, EnvState, LogRecord
from providers.lxd import LxdProvider
from providers.lxd.command import CommandLogParser
from providers.lxd.provider import KEY_AGENT, KEY_MANAGED, KEY_WORKSPACE
from tests.conftest import LXD_TEST_IMAGE

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


async def test_invalid_arguments_are_rejected(provider: LxdProvider, workspace: str) -> None:
    with pytest.raises(InvalidArgumentError):
        await provider.create(EnvironmentSpec(workspace="Bad_Name", image=IMAGE))
    with pytest.raises(InvalidArgumentError):
        await provider.create(EnvironmentSpec(workspace=workspace, image=IMAGE, cpus=0))
    with pytest.raises(InvalidArgumentError):
        await provider.create(EnvironmentSpec(workspace=workspace, image=IMAGE, command=[]))
    with pytest.raises(InvalidArgumentError):
        await provider.create(EnvironmentSpec(workspace=workspace, image=IMAGE, env={"A=B": "c"}))
    assert (await provider.inspect(workspace)).state is EnvState.ABSENT


async def test_missing_environment_is_not_found(provider: LxdProvider, workspace: str) -> None:
    assert (await provider.inspect(workspace)).state is EnvState.ABSENT
    for call in (provider.start(workspace), provider.stop(workspace)):
        with pytest.raises(NotFoundError, match="vendetta workspace up"):
            await call
    await provider.destroy(workspace)  # absent is not an error


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


async def test_agents_sharing_the_daemon_do_not_see_each_other(
    make_provider: MakeProvider, workspace: str
) -> None:
    one, two = make_provider(), make_provider()
    await one.create(EnvironmentSpec(workspace=workspace, image=IMAGE))
    await two.create(EnvironmentSpec(workspace=workspace, image=IMAGE))
    assert [s.workspace for s in await one.list()] == [workspace]
    await two.destroy(workspace)
    assert (await one.inspect(workspace)).state is EnvState.CREATED
    assert (await two.inspect(workspace)).state is EnvState.ABSENT


# -- exec ----------------------------------------------------------------------------


async def test_exec_streams_stdout_stderr_and_exit_code(
    provider: LxdProvider, running: str
) -> None:
    out, err, code = await run(provider, running, ["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (out, err, code) == (b"out\n", b"err\n", 7)


async def test_exec_env_workdir_and_no_shell(provider: LxdProvider, running: str) -> None:
    out, _, code = await run(
        provider, running, ["sh", "-c", 'echo "$SPEC_VAR $EXTRA"; pwd'], env={"EXTRA": "x"},
        workdir="/tmp",
    )  # fmt: skip
    assert (out, code) == (b"from-spec x\n/tmp\n", 0)
    out, _, code = await run(provider, running, ["echo", "$HOME; rm -rf /"])
    assert (out, code) == (b"$HOME; rm -rf /\n", 0)


async def test_exec_needs_a_running_environment(provider: LxdProvider, workspace: str) -> None:
    await provider.create(EnvironmentSpec(workspace=workspace, image=IMAGE))
    with pytest.raises(FailedPreconditionError, match="vendetta workspace up"):
        await run(provider, workspace, ["true"])
    with pytest.raises(InvalidArgumentError):
        await run(provider, workspace, [])


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
