"""DockerProvider driven directly against the real Docker engine (no gRPC, no fakes).

Needs a reachable dockerd and the test image (``VENDETTA_TEST_IMAGE``, default
``vendetta/busybox:latest``, built offline by the project's setup script); the
``docker_engine`` fixture of tests/conftest.py skips these tests without them,
and fails them when ``CI`` is set. Every test uses its own agent id and
workspace names, and removes what it created.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import docker
import pytest

from common.errors import (
    AlreadyExistsError,
    EngineUnavailableError,
    ImageNotFoundError,
)
from providers.base import (
    LABEL_AGENT,
    LABEL_MANAGED,
    LABEL_WORKSPACE,
    EnvironmentSpec,
    EnvState,
    LogRecord,
)
from providers.docker import DockerProvider
from providers.docker.provider import IDLE_COMMAND
from providers.docker.streams import THREAD_PREFIX

pytestmark = pytest.mark.docker

IMAGE = os.environ.get("VENDETTA_TEST_IMAGE", "vendetta/busybox:latest")
# Generous: nothing here should take more than a fraction of this on a healthy engine.
WAIT = 20.0

MakeProvider = Callable[[], DockerProvider]


# -- fixtures and helpers ---------------------------------------------------------


@pytest.fixture
async def make_provider(docker_engine: None) -> AsyncIterator[MakeProvider]:
    """Providers with fresh agent ids; everything they own is destroyed afterwards."""
    providers: list[DockerProvider] = []

    def make() -> DockerProvider:
        provider = DockerProvider(agent_id=uuid.uuid4().hex)
        providers.append(provider)
        return provider

    yield make
    for provider in providers:
        for status in await provider.list():
            await provider.destroy(status.workspace)
        assert await provider.list() == []
        await provider.close()


@pytest.fixture
async def provider(make_provider: MakeProvider) -> DockerProvider:
    return make_provider()


@pytest.fixture
def workspace() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def running(provider: DockerProvider, workspace: str) -> str:
    """A running idle environment; returns its workspace name."""
    await provider.create(
        EnvironmentSpec(workspace=workspace, image=IMAGE, env={"SPEC_VAR": "from-spec"})
    )
    status = await provider.start(workspace)
    assert status.state is EnvState.RUNNING
    return workspace


async def run(
    provider: DockerProvider,
    workspace: str,
    argv: list[str],
    env: dict[str, str] | None = None,
    workdir: str = "",
) -> tuple[bytes, bytes, int]:
    """Collect an exec: (stdout, stderr, exit code), checking the chunk protocol."""
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


def reader_threads(workspace: str) -> list[threading.Thread]:
    return [
        t
        for t in threading.enumerate()
        if t.name.startswith(THREAD_PREFIX) and t.name.endswith(f"-{workspace}") and t.is_alive()
    ]


async def write_to_container_log(
    provider: DockerProvider, workspace: str, records: list[LogRecord], text: str, fd: int = 1
) -> None:
    """Write ``text`` to PID 1's stdout/stderr (so to the container log) until a follower saw it.

    Repeated because a follower that has just been started may not be subscribed yet.
    """

    async def seen() -> bool:
        _, _, code = await run(provider, workspace, ["sh", "-c", f"echo {text} > /proc/1/fd/{fd}"])
        assert code == 0
        await asyncio.sleep(0.3)
        return any(r.text == text for r in records)

    await eventually(seen, f"log line {text!r} to reach the follower")


async def docker_inspect(container_id: str) -> dict[str, Any]:
    def inspect() -> dict[str, Any]:
        client = docker.from_env()
        try:
            info: dict[str, Any] = client.api.inspect_container(container_id)
            return info
        finally:
            client.close()

    return await asyncio.to_thread(inspect)


# -- readiness --------------------------------------------------------------------


async def test_readiness_reports_engine_and_images(provider: DockerProvider) -> None:
    readiness = await provider.readiness()
    assert readiness.ready, readiness.detail
    assert readiness.version
    assert "Docker Engine" in readiness.detail
    assert 0 < len(readiness.images) <= 20
    if len(readiness.images) < 20:
        assert IMAGE in readiness.images


async def test_unreachable_daemon_is_not_ready_and_create_fails() -> None:
    provider = DockerProvider(agent_id="unreachable", base_url="unix:///nonexistent.sock")
    readiness = await provider.readiness()
    assert not readiness.ready
    assert readiness.detail.startswith("Docker daemon not reachable at unix:///nonexistent.sock")
    assert "DOCKER_HOST" in readiness.detail

    with pytest.raises(EngineUnavailableError, match="systemctl start docker"):
        await provider.create(EnvironmentSpec(workspace="w1", image=IMAGE))
    with pytest.raises(EngineUnavailableError):
        await provider.inspect("w1")
    with pytest.raises(EngineUnavailableError):
        async for _ in provider.logs("w1", follow=False, tail=None):
            pass
    await provider.close()


# -- lifecycle --------------------------------------------------------------------


async def test_lifecycle_create_start_stop_destroy(
    provider: DockerProvider, workspace: str
) -> None:
    spec = EnvironmentSpec(
        workspace=workspace, image=IMAGE, env={"A": "1"}, cpus=0.5, memory_bytes=64 * 2**20
    )
    created = await provider.create(spec)
    assert created.state is EnvState.CREATED
    assert created.workspace == workspace and created.provider == "docker"
    assert created.id and created.image == IMAGE

    info = await docker_inspect(created.id)
    assert info["Name"] == f"/vendetta-{workspace}-{provider.agent_id[:8]}"
    labels = info["Config"]["Labels"]
    assert labels[LABEL_MANAGED] == "true"
    assert labels[LABEL_AGENT] == provider.agent_id
    assert labels[LABEL_WORKSPACE] == workspace
    assert info["Config"]["Cmd"] == list(IDLE_COMMAND)
    assert "A=1" in info["Config"]["Env"]
    assert info["HostConfig"]["NanoCpus"] == 500_000_000
    assert info["HostConfig"]["Memory"] == 64 * 2**20
    assert info["State"]["Status"] == "created", "create must not start the container"

    assert (await provider.inspect(workspace)).state is EnvState.CREATED
    with pytest.raises(AlreadyExistsError, match=workspace):
        await provider.create(spec)

    started = await provider.start(workspace)
    assert started.state is EnvState.RUNNING
    assert started.id == created.id
    assert started.addresses, "a running container on the default bridge has an address"
    again = await provider.start(workspace)  # idempotent
    assert again.state is EnvState.RUNNING and again.id == created.id

    listed = await provider.list()
    assert [(s.workspace, s.state) for s in listed] == [(workspace, EnvState.RUNNING)]

    stopped = await provider.stop(workspace, timeout=5)
    assert stopped.state is EnvState.STOPPED
    # The idle command exits on SIGTERM by itself: exit 0, not 137 (killed).
    assert "exited" in stopped.detail and "exit code 0" in stopped.detail
    assert (await provider.stop(workspace, timeout=5)).state is EnvState.STOPPED  # idempotent

    assert (await provider.start(workspace)).state is EnvState.RUNNING  # restartable

    await provider.destroy(workspace)
    gone = await provider.inspect(workspace)
    assert gone.state is EnvState.ABSENT and gone.id == ""
    assert await provider.list() == []
    await provider.destroy(workspace)  # absent is fine


async def test_missing_image_raises_image_not_found(
    provider: DockerProvider, workspace: str
) -> None:
    image = f"vendetta/does-not-exist-{uuid.uuid4().hex[:8]}:never"
    with pytest.raises(ImageNotFoundError) as caught:
        await provider.create(EnvironmentSpec(workspace=workspace, image=image))
    message = str(caught.value)
    assert f"image '{image}' is not on this node and could not be pulled" in message
    assert "docker load" in message and "docker.image" in message
    assert (await provider.inspect(workspace)).state is EnvState.ABSENT


async def test_pull_from_a_silent_registry_is_bounded(
    make_provider: MakeProvider, workspace: str
) -> None:
    """A registry that accepts connections and never answers must not hang create()."""
    host = os.environ.get("DOCKER_HOST", "")
    if host and not host.startswith("unix://"):
        pytest.skip("dockerd must share this host's loopback to reach the fake registry")
    writers: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await reader.read()  # say nothing until the peer hangs up

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    provider = DockerProvider(agent_id=uuid.uuid4().hex, pull_stall_timeout=1.0)
    try:
        image = f"127.0.0.1:{port}/vendetta/silent:1"
        with pytest.raises(ImageNotFoundError) as caught:
            await asyncio.wait_for(
                provider.create(EnvironmentSpec(workspace=workspace, image=image)), WAIT
            )
        # Our bound fired (dockerd alone gives up only after ~25 s, with another message).
        assert "no progress for 1s" in str(caught.value)
        assert image in str(caught.value)
    finally:
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()
        await provider.close()


# -- exec -------------------------------------------------------------------------


async def test_cancelling_exec_ends_its_reader_thread(
    provider: DockerProvider, running: str
) -> None:
    first = asyncio.Event()

    async def consume() -> None:
        async for chunk in provider.exec(running, ["sh", "-c", "echo started; sleep 600"]):
            if chunk.stdout:
                first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), WAIT)
    assert reader_threads(running), "the exec reader thread should be running"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert reader_threads(running) == []


# -- logs -------------------------------------------------------------------------


async def test_logs_without_follow_tail_and_since(provider: DockerProvider, workspace: str) -> None:
    script = (
        "echo one; echo two; sleep 0.3; echo three >&2; sleep 0.3; echo four; "
        "trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done"
    )
    await provider.create(
        EnvironmentSpec(workspace=workspace, image=IMAGE, command=["sh", "-c", script])
    )
    await provider.start(workspace)

    async def all_logs(**kwargs: Any) -> list[LogRecord]:
        return [r async for r in provider.logs(workspace, follow=False, **kwargs)]

    async def four_lines() -> bool:
        return len(await all_logs(tail=None)) >= 4

    await eventually(four_lines, "four log lines")

    records = await all_logs(tail=None)
    assert [(r.stream, r.text) for r in records] == [
        ("stdout", "one"),
        ("stdout", "two"),
        ("stderr", "three"),
        ("stdout", "four"),
    ]
    times = [r.time_unix_nano for r in records]
    assert times == sorted(times)
    assert all(abs(t - time.time_ns()) < 3600 * 10**9 for t in times), times

    # tail counts the lines of both streams together.
    assert [r.text for r in await all_logs(tail=2)] == ["three", "four"]
    assert await all_logs(tail=0) == []
    # since is inclusive, to the nanosecond.
    since = await all_logs(tail=None, since_unix_nano=records[2].time_unix_nano)
    assert [r.text for r in since] == ["three", "four"]
    assert reader_threads(workspace) == []


async def test_logs_follow_gets_new_lines_and_ends_when_stopped(
    provider: DockerProvider, running: str
) -> None:
    records: list[LogRecord] = []

    async def follow() -> None:
        async for record in provider.logs(running, follow=True, tail=0):
            records.append(record)

    task = asyncio.create_task(follow())
    await write_to_container_log(provider, running, records, "hello-out", fd=1)
    await write_to_container_log(provider, running, records, "hello-err", fd=2)
    assert {(r.stream, r.text) for r in records} == {
        ("stdout", "hello-out"),
        ("stderr", "hello-err"),
    }
    assert not task.done()

    await provider.stop(running, timeout=5)
    await asyncio.wait_for(task, WAIT)  # ends by itself, without error
    assert reader_threads(running) == []


async def test_cancelling_a_follow_closes_the_stream_and_thread(
    provider: DockerProvider, running: str
) -> None:
    records: list[LogRecord] = []

    async def follow() -> None:
        async for record in provider.logs(running, follow=True, tail=None):
            records.append(record)

    task = asyncio.create_task(follow())
    await write_to_container_log(provider, running, records, "subscribed")
    assert len(reader_threads(running)) == 1

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert reader_threads(running) == [], "cancelling must close the stream and end the thread"
    assert (await provider.inspect(running)).state is EnvState.RUNNING

    # Closing the generator early (break + aclose) cleans up the same way.
    follower = provider.logs(running, follow=True, tail=None)
    async with contextlib.aclosing(follower):
        async for record in follower:
            assert record.text == "subscribed"
            break
    assert reader_threads(running) == []
