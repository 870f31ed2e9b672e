"""One conformance suite for every provider, through the agent's real gRPC wire.

Each provider runs behind a real AgentServer on a unix socket and is driven
with the generated NodeAgent stub, exactly as the coordinator drives it. A new
provider joins by adding a ``ProviderCase`` to ``CASES``.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import grpc.aio
import pytest

from nodeagent.providers import ProviderSet
from nodeagent.server import AgentServer, agent_id
from providers.base import Provider
from tests.conftest import LXD_TEST_IMAGE, TEST_IMAGE
from vendetta.v1 import common_pb2, nodeagent_pb2, nodeagent_pb2_grpc

if TYPE_CHECKING:
    from vendetta.v1.nodeagent_pb2_grpc import NodeAgentAsyncStub


@dataclass(frozen=True)
class ProviderCase:
    name: str
    make: Callable[[str], Provider]
    image: str
    missing_image: str
    marks: tuple[pytest.MarkDecorator, ...]


def _docker(agent_id: str) -> Provider:
    from providers.docker import DockerProvider

    return DockerProvider(agent_id)


def _lxd(agent_id: str) -> Provider:
    from providers.lxd import LxdProvider

    return LxdProvider(agent_id)


def _qemu(agent_id: str) -> Provider:
    from providers.qemu import QemuProvider

    return QemuProvider(agent_id)


CASES = [
    ProviderCase("docker", _docker, TEST_IMAGE, "vendetta/absent:0", (pytest.mark.docker,)),
    ProviderCase("lxd", _lxd, LXD_TEST_IMAGE, "vendetta/absent", (pytest.mark.lxd,)),
    ProviderCase("qemu", _qemu, "debian-12", "absent-guest", (pytest.mark.qemu,)),
]


@dataclass
class Agent:
    stub: NodeAgentAsyncStub
    provider: str
    case: ProviderCase
    agent_dir: Path

    def ws(self) -> str:
        return f"conf-{uuid.uuid4().hex[:8]}"

    def spec(self, ws: str, **kw: object) -> nodeagent_pb2.CreateEnvironmentRequest:
        spec = nodeagent_pb2.EnvironmentSpec(
            workspace=ws,
            provider=self.provider,
            image=self.case.image,
            **kw,  # type: ignore[arg-type]
        )
        return nodeagent_pb2.CreateEnvironmentRequest(spec=spec)

    def ref(self, ws: str) -> nodeagent_pb2.EnvironmentRequest:
        return nodeagent_pb2.EnvironmentRequest(workspace=ws, provider=self.provider)

    async def exec(
        self, ws: str, *argv: str, env: dict[str, str] | None = None, workdir: str = ""
    ) -> tuple[bytes, bytes, int]:
        out, err, code = b"", b"", -1
        request = nodeagent_pb2.ExecRequest(
            workspace=ws, provider=self.provider, argv=argv, env=env or {}, workdir=workdir
        )
        async for o in self.stub.Exec(request):
            kind = o.WhichOneof("output")
            if kind == "stdout":
                out += o.stdout
            elif kind == "stderr":
                err += o.stderr
            elif kind == "exit_code":
                code = o.exit_code
        return out, err, code


@contextlib.asynccontextmanager
async def running_agent(case: ProviderCase, agent_dir: Path | None = None) -> AsyncIterator[Agent]:
    """A real AgentServer for ``case`` on a unix socket; ``agent_dir`` again is the same
    agent restarted. Destroys what it created only when the folder is its own."""
    own = agent_dir is None
    if agent_dir is None:
        agent_dir = Path(tempfile.mkdtemp(prefix="vd-conf-", dir="/tmp"))
    providers = ProviderSet({case.name: case.make(agent_id(agent_dir))})
    server = AgentServer(agent_dir, providers=providers)
    await server.start()
    channel = grpc.aio.insecure_channel(f"unix:{server.socket}")
    a = Agent(nodeagent_pb2_grpc.NodeAgentStub(channel), case.name, case, agent_dir)
    try:
        yield a
    finally:
        if own:
            listed = await a.stub.ListEnvironments(nodeagent_pb2.ListEnvironmentsRequest())
            for env in listed.environments:
                await a.stub.DestroyEnvironment(a.ref(env.workspace))
        await channel.close(None)
        await server.stop()
        if own:
            shutil.rmtree(agent_dir, ignore_errors=True)


@pytest.fixture(params=[pytest.param(c, marks=c.marks, id=c.name) for c in CASES])
async def agent(request: pytest.FixtureRequest) -> AsyncIterator[Agent]:
    async with running_agent(request.param) as a:
        yield a


async def test_info_reports_the_provider_ready(agent: Agent) -> None:
    info = await agent.stub.Info(nodeagent_pb2.InfoRequest())
    (p,) = [p for p in info.providers if p.name == agent.provider]
    assert p.ready, p.detail
    assert set(p.capabilities) <= {"long_exec_streams", "terminal", "stdin"}
    assert info.capacity.cpus >= 1 and info.agent_id


async def test_lifecycle_is_idempotent(agent: Agent) -> None:
    ws = agent.ws()
    env = await agent.stub.CreateEnvironment(agent.spec(ws))
    assert env.state in (common_pb2.ENVIRONMENT_STATE_CREATED, common_pb2.ENVIRONMENT_STATE_STOPPED)
    with pytest.raises(grpc.aio.AioRpcError) as dup:
        await agent.stub.CreateEnvironment(agent.spec(ws))
    assert dup.value.code() == grpc.StatusCode.ALREADY_EXISTS
    for _ in range(2):
        env = await agent.stub.StartEnvironment(agent.ref(ws))
        assert env.state == common_pb2.ENVIRONMENT_STATE_RUNNING
    listed = await agent.stub.ListEnvironments(nodeagent_pb2.ListEnvironmentsRequest())
    assert [e.workspace for e in listed.environments] == [ws]
    for _ in range(2):
        env = await agent.stub.StopEnvironment(
            nodeagent_pb2.StopEnvironmentRequest(
                workspace=ws, provider=agent.provider, timeout_seconds=5
            )
        )
        assert env.state == common_pb2.ENVIRONMENT_STATE_STOPPED
    with pytest.raises(grpc.aio.AioRpcError) as stopped:
        await agent.exec(ws, "true")
    assert stopped.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"vendetta workspace up {ws}" in (stopped.value.details() or "")
    for _ in range(2):
        await agent.stub.DestroyEnvironment(agent.ref(ws))
    env = await agent.stub.InspectEnvironment(agent.ref(ws))
    assert env.state == common_pb2.ENVIRONMENT_STATE_ABSENT


async def test_exec_streams_output_and_exit_code(agent: Agent) -> None:
    ws = agent.ws()
    await agent.stub.CreateEnvironment(agent.spec(ws, env={"GREETING": "hi there"}))
    with pytest.raises(grpc.aio.AioRpcError) as stopped:
        await agent.exec(ws, "true")
    assert stopped.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "vendetta workspace up" in (stopped.value.details() or "")
    await agent.stub.StartEnvironment(agent.ref(ws))
    out, err, code = await agent.exec(ws, "sh", "-c", 'echo "$GREETING"; echo oops >&2; exit 3')
    assert (out, err, code) == (b"hi there\n", b"oops\n", 3)
    # argv is passed as a list: no shell interprets it
    out, _, code = await agent.exec(ws, "echo", "$HOME; rm -rf /")
    assert (out, code) == (b"$HOME; rm -rf /\n", 0)


async def test_logs_tail_and_follow(agent: Agent) -> None:
    ws = agent.ws()
    script = "for i in 1 2 3; do echo line $i; done; echo warn >&2; while :; do sleep 0.2; done"
    await agent.stub.CreateEnvironment(agent.spec(ws, command=["sh", "-c", script]))
    await agent.stub.StartEnvironment(agent.ref(ws))
    req = nodeagent_pb2.AgentLogsRequest(workspace=ws, provider=agent.provider, tail=0)
    lines: list[common_pb2.LogLine] = []
    expected = {("stdout", "line 1"), ("stdout", "line 3"), ("stderr", "warn")}
    for _ in range(150):  # each stream comes in its own time (QEMU: three host files)
        lines = [ln async for b in agent.stub.StreamLogs(req) for ln in b.lines]
        if expected <= {(ln.stream, ln.text) for ln in lines}:
            break
        await asyncio.sleep(0.1)
    texts = {(ln.stream, ln.text) for ln in lines}
    assert expected <= texts
    assert all(ln.time_unix_nano > 0 for ln in lines)

    follow = agent.stub.StreamLogs(
        nodeagent_pb2.AgentLogsRequest(workspace=ws, provider=agent.provider, follow=True, tail=1)
    )

    async def collect() -> list[str]:
        got: list[str] = []
        async for batch in follow:
            got.extend(ln.text for ln in batch.lines)
            if "fresh line" in got:
                return got
        return got

    reader = asyncio.create_task(collect())
    await asyncio.sleep(0.5)
    _, _, code = await agent.exec(ws, "sh", "-c", "echo 'fresh line' > /proc/1/fd/1")
    assert code == 0
    got = await asyncio.wait_for(reader, 30)
    assert "fresh line" in got


async def test_follow_ends_when_environment_stops(agent: Agent) -> None:
    ws = agent.ws()
    await agent.stub.CreateEnvironment(
        agent.spec(ws, command=["sh", "-c", "echo up; exec sleep 600"])
    )
    await agent.stub.StartEnvironment(agent.ref(ws))
    follow = agent.stub.StreamLogs(
        nodeagent_pb2.AgentLogsRequest(workspace=ws, provider=agent.provider, follow=True)
    )

    async def drain() -> int:
        return sum([len(b.lines) async for b in follow])

    reader = asyncio.create_task(drain())
    await asyncio.sleep(0.5)
    await agent.stub.StopEnvironment(
        nodeagent_pb2.StopEnvironmentRequest(
            workspace=ws, provider=agent.provider, timeout_seconds=1
        )
    )
    assert await asyncio.wait_for(reader, 30) >= 1


async def test_errors_name_the_cause(agent: Agent) -> None:
    ws = agent.ws()
    req = agent.spec(ws)
    req.spec.image = agent.case.missing_image
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await agent.stub.CreateEnvironment(req)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert agent.case.missing_image in (missing.value.details() or "")
    env = await agent.stub.InspectEnvironment(agent.ref(ws))
    assert env.state == common_pb2.ENVIRONMENT_STATE_ABSENT  # nothing half-created
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await agent.stub.StartEnvironment(agent.ref("no-such-ws"))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await agent.stub.CreateEnvironment(agent.spec("Bad_Name"))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as other:
        await agent.stub.InspectEnvironment(
            nodeagent_pb2.EnvironmentRequest(workspace=ws, provider="nope")
        )
    assert other.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not available on this node" in (other.value.details() or "")


async def test_terminal_types_resizes_and_exits(agent: Agent) -> None:
    """Every provider with ``capabilities.terminal``: a shell on a PTY through Attach."""
    info = await agent.stub.Info(nodeagent_pb2.InfoRequest())
    (p,) = [p for p in info.providers if p.name == agent.provider]
    if "terminal" not in p.capabilities:
        pytest.skip(f"{agent.provider} has no interactive terminals (capabilities.terminal)")
    ws = agent.ws()
    await agent.stub.CreateEnvironment(agent.spec(ws))
    await agent.stub.StartEnvironment(agent.ref(ws))

    queue: asyncio.Queue[common_pb2.AttachInput | None] = asyncio.Queue()
    start = common_pb2.AttachStart(
        workspace=ws,
        provider=agent.provider,
        argv=["/bin/sh"],
        tty=True,
        size=common_pb2.TerminalSize(rows=30, cols=120),
    )

    async def inputs() -> AsyncIterator[common_pb2.AttachInput]:
        yield common_pb2.AttachInput(start=start)
        while (msg := await queue.get()) is not None:
            yield msg

    out = bytearray()
    codes: list[int] = []

    async def read() -> None:
        async for o in agent.stub.Attach(inputs()):
            kind = o.WhichOneof("output")
            if kind == "stdout":
                out.extend(o.stdout)
            elif kind == "stderr":
                out.extend(o.stderr)
            elif kind == "exit_code":
                codes.append(o.exit_code)

    reader = asyncio.create_task(read())

    def type_(text: str) -> None:
        queue.put_nowait(common_pb2.AttachInput(stdin=text.encode()))

    async def shows(text: str, within: float = 30) -> bool:
        deadline = asyncio.get_running_loop().time() + within
        while text.encode() not in out:
            if reader.done():
                reader.result()  # the stream's error, if it ended with one
                pytest.fail(f"the terminal ended before {text!r} showed:\n{out.decode()}")
            if asyncio.get_running_loop().time() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    try:
        # Arithmetic, so the terminal's echo of what was typed never matches what is awaited.
        type_("echo hi-$((6*7)); stty size\n")
        assert await shows("hi-42") and await shows("30 120"), out.decode()
        type_("[ -t 0 ] && [ -t 1 ] && echo tty-$((2+3))\n")
        assert await shows("tty-5"), out.decode()
        queue.put_nowait(common_pb2.AttachInput(resize=common_pb2.TerminalSize(rows=20, cols=100)))
        # A resize and the next keys may travel apart (LXD: two websockets; QEMU: a
        # guest-exec of stty beside the console): ask again.
        for _ in range(5):
            type_("stty size\n")
            if await shows("20 100", within=2):
                break
        assert b"20 100" in out, out.decode()
        type_("exit 3\n")
        await asyncio.wait_for(reader, 30)
        assert codes == [3]
    finally:
        queue.put_nowait(None)
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)


async def test_a_command_on_pipes_reads_stdin_to_its_end(agent: Agent) -> None:
    """Attach without a terminal: stdin in (where ``capabilities.stdin``), stdout and
    stderr apart, the exit code; without that capability the command reads nothing."""
    info = await agent.stub.Info(nodeagent_pb2.InfoRequest())
    (p,) = [p for p in info.providers if p.name == agent.provider]
    ws = agent.ws()
    await agent.stub.CreateEnvironment(agent.spec(ws))
    await agent.stub.StartEnvironment(agent.ref(ws))
    start = common_pb2.AttachStart(
        workspace=ws,
        provider=agent.provider,
        argv=["sh", "-c", "wc -c; echo done >&2; exit 4"],
    )
    data = bytes(range(256)) * 4096  # 1 MiB in 16 messages, binary

    async def inputs() -> AsyncIterator[common_pb2.AttachInput]:
        yield common_pb2.AttachInput(start=start)
        for i in range(0, len(data), 65536):
            yield common_pb2.AttachInput(stdin=data[i : i + 65536])
        yield common_pb2.AttachInput(stdin_eof=True)

    out, err, codes = b"", b"", []
    async for o in agent.stub.Attach(inputs(), timeout=120):
        kind = o.WhichOneof("output")
        if kind == "stdout":
            out += o.stdout
        elif kind == "stderr":
            err += o.stderr
        elif kind == "exit_code":
            codes.append(o.exit_code)
    expected = len(data) if "stdin" in p.capabilities else 0
    assert (out.strip(), err, codes) == (str(expected).encode(), b"done\n", [4])


async def test_exec_env_workdir_and_missing_environments(agent: Agent) -> None:
    ws = agent.ws()
    with pytest.raises(grpc.aio.AioRpcError) as absent:
        await agent.exec(ws, "true")
    assert absent.value.code() == grpc.StatusCode.NOT_FOUND
    assert f"vendetta workspace create {ws}" in (absent.value.details() or "")
    logs = agent.stub.StreamLogs(
        nodeagent_pb2.AgentLogsRequest(workspace=ws, provider=agent.provider)
    )
    with pytest.raises(grpc.aio.AioRpcError) as no_logs:
        async for _ in logs:
            pass
    assert no_logs.value.code() == grpc.StatusCode.NOT_FOUND
    await agent.stub.DestroyEnvironment(agent.ref(ws))  # absent is fine
    await agent.stub.CreateEnvironment(agent.spec(ws, env={"FROM_SPEC": "s", "BOTH": "spec"}))
    await agent.stub.StartEnvironment(agent.ref(ws))
    script = 'echo "$FROM_SPEC $BOTH $FROM_EXEC"; pwd'
    out, _, code = await agent.exec(
        ws, "sh", "-c", script, env={"BOTH": "exec", "FROM_EXEC": "e"}, workdir="/tmp"
    )
    assert (out, code) == (b"s exec e\n/tmp\n", 0)


async def test_logs_tail_and_since(agent: Agent) -> None:
    ws = agent.ws()
    script = "for i in 1 2 3 4 5; do echo tail $i; done; while :; do sleep 0.2; done"
    await agent.stub.CreateEnvironment(agent.spec(ws, command=["sh", "-c", script]))
    await agent.stub.StartEnvironment(agent.ref(ws))

    async def read(**kw: object) -> list[str]:
        req = nodeagent_pb2.AgentLogsRequest(workspace=ws, provider=agent.provider, **kw)  # type: ignore[arg-type]
        return [ln.text async for b in agent.stub.StreamLogs(req) for ln in b.lines]

    for _ in range(100):
        if "tail 5" in await read(tail=0):
            break
        await asyncio.sleep(0.1)
    everything = await read(tail=0)
    assert [t for t in everything if t.startswith("tail ")] == [f"tail {i}" for i in range(1, 6)]
    assert await read(tail=2) == everything[-2:]
    future = (time.time() + 3600) * 1e9
    assert await read(tail=0, since_unix_nano=int(future)) == []


async def test_published_port_reaches_a_listener_inside_on_loopback_only(agent: Agent) -> None:
    ws = agent.ws()
    created = await agent.stub.CreateEnvironment(agent.spec(ws, ports=[7000]))
    assert dict(created.ports) == {}  # nothing is published while it is not running
    env = await agent.stub.StartEnvironment(agent.ref(ws))
    assert set(env.ports) == {7000}
    host, _, port = env.ports[7000].rpartition(":")
    assert host == "127.0.0.1"
    serve = "nc -ll -p 7000 -e echo pong </dev/null >/dev/null 2>&1 &"
    _, _, code = await agent.exec(ws, "sh", "-c", serve)
    assert code == 0
    answer = b""
    for _ in range(100):  # until the listener inside is up
        with contextlib.suppress(OSError):
            reader, writer = await asyncio.open_connection(host, int(port))
            try:
                answer = await asyncio.wait_for(reader.read(), 10)
            finally:
                writer.close()
        if answer:
            break
        await asyncio.sleep(0.2)
    assert answer == b"pong\n"
    with pytest.raises(OSError):  # not on the node's other addresses
        await asyncio.open_connection("127.0.0.2", int(port))
    stopped = await agent.stub.StopEnvironment(
        nodeagent_pb2.StopEnvironmentRequest(
            workspace=ws, provider=agent.provider, timeout_seconds=2
        )
    )
    assert dict(stopped.ports) == {}


async def test_agents_sharing_an_engine_do_not_see_each_other(agent: Agent) -> None:
    ws = agent.ws()
    other_dir = Path(tempfile.mkdtemp(prefix="vd-conf-", dir="/tmp"))
    try:
        async with running_agent(agent.case, other_dir) as other:
            mine = await agent.stub.CreateEnvironment(agent.spec(ws))
            theirs = await other.stub.CreateEnvironment(other.spec(ws))
            assert mine.id != theirs.id
            for a, env in ((agent, mine), (other, theirs)):
                listed = await a.stub.ListEnvironments(nodeagent_pb2.ListEnvironmentsRequest())
                assert [(e.workspace, e.id) for e in listed.environments] == [(ws, env.id)]
            await agent.stub.DestroyEnvironment(agent.ref(ws))
            still = await other.stub.InspectEnvironment(other.ref(ws))
            assert still.state != common_pb2.ENVIRONMENT_STATE_ABSENT and still.id == theirs.id
            await other.stub.StartEnvironment(other.ref(ws))
        # The same agent, restarted, finds its environment again by its labels.
        async with running_agent(agent.case, other_dir) as restarted:
            found = await restarted.stub.InspectEnvironment(restarted.ref(ws))
            assert (found.id, found.state) == (theirs.id, common_pb2.ENVIRONMENT_STATE_RUNNING)
    finally:
        async with running_agent(agent.case, other_dir) as cleaner:
            await cleaner.stub.DestroyEnvironment(cleaner.ref(ws))
        shutil.rmtree(other_dir, ignore_errors=True)


async def test_a_terminal_needs_a_running_environment(agent: Agent) -> None:
    ws = agent.ws()
    await agent.stub.CreateEnvironment(agent.spec(ws))
    start = common_pb2.AttachStart(
        workspace=ws,
        provider=agent.provider,
        argv=["/bin/sh"],
        tty=True,
        size=common_pb2.TerminalSize(rows=24, cols=80),
    )

    async def inputs() -> AsyncIterator[common_pb2.AttachInput]:
        yield common_pb2.AttachInput(start=start)

    with pytest.raises(grpc.aio.AioRpcError) as stopped:
        async for _ in agent.stub.Attach(inputs(), timeout=60):
            pass
    assert stopped.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"vendetta workspace up {ws}" in (stopped.value.details() or "")


async def test_the_coordinator_that_made_it_is_kept(agent: Agent) -> None:
    """Orphans (`node status`, `node clean`) tell one coordinator's environments from
    another's on a shared node user by this label, on every engine."""
    ws = agent.ws()
    made = await agent.stub.CreateEnvironment(agent.spec(ws, owner="coord-1234abcd"))
    assert made.owner == "coord-1234abcd"
    assert (await agent.stub.InspectEnvironment(agent.ref(ws))).owner == "coord-1234abcd"
    listed = await agent.stub.ListEnvironments(nodeagent_pb2.ListEnvironmentsRequest())
    assert [e.owner for e in listed.environments if e.workspace == ws] == ["coord-1234abcd"]


@pytest.mark.docker
async def test_a_watch_of_services_starts_with_their_state() -> None:
    """A watcher that starts after the services did (the coordinator's relay, set up
    while a restarted agent resumes them) gets their state first, not only later news."""
    async with running_agent(CASES[0]) as agent:
        ws = agent.ws()
        await agent.stub.CreateEnvironment(agent.spec(ws))
        await agent.stub.StartEnvironment(agent.ref(ws))
        start = nodeagent_pb2.StartServicesRequest(
            workspace=ws,
            provider=agent.provider,
            services=[common_pb2.ServiceSpec(name="sleeper", command=["sleep", "300"])],
        )
        async for _ in agent.stub.StartServices(start):
            pass
        watch = agent.stub.WatchServices(agent.ref(ws))
        first = await asyncio.wait_for(watch.read(), 30)
        watch.cancel()
        assert isinstance(first, common_pb2.ServiceEvent)
        assert (first.service.name, first.message) == ("sleeper", "")
        assert first.service.pid > 0
