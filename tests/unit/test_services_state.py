"""The supervisor's state on disk and its own types.

The state file (what a restarted agent resumes) is replaced whole, off the
event loop, in call order; a write that dies midway leaves the old state. The
format of agents before it (hex-encoded ServiceSpec messages) is still read,
once: the resume writes it again in the current format. The supervisor's API
answers with its own dataclasses and enum; protobuf starts at the servicer.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path

import pytest

from nodeagent import convert
from nodeagent.providers import ProviderSet
from nodeagent.services import state
from nodeagent.services.logstore import LogStore
from nodeagent.services.manager import ServiceManager
from nodeagent.services.model import ServiceEvent, ServiceState, ServiceStatus
from nodeagent.services.spec import Health, ServiceDef
from nodeagent.services.state import SavedState, StateFile
from nodeagent.services.supervisor import WorkspaceSupervisor
from providers.base import Capabilities, EnvironmentStatus, EnvState, ExecChunk
from tests.support.fake_env import FakeEnv
from vendetta.v1 import common_pb2

WAIT = 5.0


def services(n: int = 2, tag: str = "") -> tuple[ServiceDef, ...]:
    """``n`` services, each depending on the one before; ``tag`` tells states apart."""
    out = []
    for i in range(n):
        out.append(
            ServiceDef(
                name=f"svc{i}",
                argv=(f"/usr/bin/svc{i}", "--tag", tag or "none"),
                port=8000 + i,
                depends_on=(f"svc{i - 1}",) if i else (),
                health=Health(http="/up", retries=3, interval=0.5) if i % 2 else None,
                env={"TAG": tag},
                restart="always",
            )
        )
    return tuple(out)


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(state.TEMP_SUFFIX))


async def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    async with asyncio.timeout(timeout):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.005)


# -- the format ------------------------------------------------------------------------


def test_state_round_trips_every_field() -> None:
    saved = SavedState("docker", services(3, "x"))
    assert state.decode(state.encode(saved)) == saved
    assert json.loads(state.encode(saved))["format"] == state.FORMAT


def legacy_bytes(provider: str, specs: Sequence[ServiceDef]) -> bytes:
    """The state file as agents before the current format wrote it."""
    hexes = []
    for s in specs:
        pb = common_pb2.ServiceSpec(
            name=s.name,
            command=s.argv,
            port=s.port,
            depends_on=s.depends_on,
            env=dict(s.env),
            restart=s.restart,
        )
        if s.health is not None:
            h = s.health
            pb.health.CopyFrom(
                common_pb2.HealthCheck(
                    http=h.http,
                    tcp=h.tcp,
                    command=h.command,
                    interval_seconds=h.interval,
                    timeout_seconds=h.timeout,
                    retries=h.retries,
                    start_period_seconds=h.start_period,
                )
            )
        hexes.append(pb.SerializeToString().hex())
    return json.dumps({"provider": provider, "services": hexes}).encode()


def test_the_earlier_format_is_read_with_the_edge_decoder() -> None:
    specs = services(3, "old")
    raw = legacy_bytes("lxd", specs)
    assert state.decode(raw, convert.service_from_saved_pb) == SavedState("lxd", specs)
    with pytest.raises(ValueError, match="saved by an earlier agent"):
        state.decode(raw)
    with pytest.raises(ValueError, match="not a saved service"):
        state.decode(b'{"provider": "lxd", "services": ["ffff"]}', convert.service_from_saved_pb)
    with pytest.raises(ValueError, match="unknown format 7"):
        state.decode(b'{"format": 7, "provider": "lxd", "services": []}')


# -- atomic writes ---------------------------------------------------------------------


async def test_a_save_replaces_the_file_and_never_rewrites_it_in_place(tmp_path: Path) -> None:
    """A reader that opened the old file keeps reading it whole: the new state is a
    new file renamed over the path, never the old one truncated and rewritten."""
    path = tmp_path / "state" / "ws.json"
    store = StateFile(path)
    first = SavedState("docker", services(2, "first"))
    await store.write(first)
    with path.open("rb") as reader:
        before = os.fstat(reader.fileno()).st_ino
        await store.write(SavedState("docker", services(40, "second")))
        assert reader.read() == state.encode(first)
    assert os.stat(path).st_ino != before
    assert (await store.read()).services == services(40, "second")
    assert temporaries(path.parent) == []


@pytest.mark.parametrize("dies_in", ["fsync", "replace"])
async def test_a_write_that_dies_midway_leaves_the_old_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dies_in: str
) -> None:
    path = tmp_path / "state" / "ws.json"
    store = StateFile(path)
    old = SavedState("docker", services(2, "old"))
    await store.write(old)

    def crash(*args: object) -> None:
        raise OSError(5, f"simulated failure in {dies_in}")

    monkeypatch.setattr(os, dies_in, crash)
    with pytest.raises(OSError, match="simulated failure"):
        await store.write(SavedState("docker", services(3, "new")))
    monkeypatch.undo()

    assert path.read_bytes() == state.encode(old)
    assert temporaries(path.parent) == []  # the unfinished new state is gone too


async def test_writes_run_in_a_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[threading.Thread] = []
    real = state.write_atomic

    def record(path: Path, data: bytes) -> None:
        threads.append(threading.current_thread())
        real(path, data)

    monkeypatch.setattr(state, "write_atomic", record)
    store = StateFile(tmp_path / "ws.json")
    await store.write(SavedState("docker", services(1)))
    assert len(threads) == 1 and threads[0] is not threading.main_thread()


async def test_concurrent_writes_land_in_call_order_and_are_always_whole(tmp_path: Path) -> None:
    path = tmp_path / "ws.json"
    store = StateFile(path)
    await store.write(SavedState("docker", services(1, "start")))
    seen: list[SavedState] = []
    broken: list[BaseException] = []
    done = threading.Event()

    def watch() -> None:  # a reader that never opens the file half-written
        while not done.is_set():
            try:
                seen.append(state.decode(path.read_bytes()))
            except FileNotFoundError:
                continue
            except Exception as exc:  # half a file would not decode
                broken.append(exc)

    reader = threading.Thread(target=watch)
    reader.start()
    try:
        await asyncio.gather(
            *(store.write(SavedState("docker", services(30, str(i)))) for i in range(40))
        )
    finally:
        done.set()
        await asyncio.to_thread(reader.join)
    assert broken == []
    assert seen, "the reader read nothing"
    assert (await store.read()).services == services(30, "39")  # the last one asked wins
    # A removal asked after a write comes after it.
    await asyncio.gather(store.write(SavedState("docker", services(1))), store.remove())
    assert not path.exists()


def test_temporaries_left_by_a_crash_are_removed_recent_ones_kept(tmp_path: Path) -> None:
    stale, fresh = tmp_path / ".ws.json.a1.tmp", tmp_path / ".ws.json.b2.tmp"
    stale.write_text("{")
    fresh.write_text("{")
    os.utime(stale, (time.time() - 60, time.time() - 60))
    (tmp_path / "ws.json").write_text("{}")
    state.remove_temporaries(tmp_path, before=time.time() - 30)
    assert sorted(p.name for p in tmp_path.iterdir()) == [fresh.name, "ws.json"]


# -- the supervisor's own types --------------------------------------------------------


async def test_the_supervisor_answers_with_its_own_types(tmp_path: Path) -> None:
    env = FakeEnv()
    sup = WorkspaceSupervisor("ws", "fake", env, tmp_path / "ws.json", LogStore(tmp_path / "l"))
    plain = [ServiceDef("db", ("/usr/bin/db",)), ServiceDef("web", ("/usr/bin/web",), port=80)]
    try:
        with sup.events.subscribe() as watched:
            async with asyncio.timeout(WAIT):
                events = [ev async for ev in sup.start(plain)]
            assert all(type(ev) is ServiceEvent for ev in [*events, *watched.drain()])
        assert all(type(ev.service) is ServiceStatus for ev in events)
        statuses = sup.statuses()
        assert [(s.name, s.state) for s in statuses] == [
            ("db", ServiceState.HEALTHY),
            ("web", ServiceState.HEALTHY),
        ]
        assert "web: healthy (started (no health check))" in [ev.message for ev in events]
        stopped = await sup.stop(timeout=0.2)
        assert [type(s) for s in stopped] == [ServiceStatus, ServiceStatus]
        assert {s.state for s in stopped} == {ServiceState.STOPPED}
    finally:
        await sup.close()
        await env.shutdown()


def test_every_state_has_its_protobuf_value() -> None:
    for st in ServiceState:
        pb = convert.service_status_to_pb(ServiceStatus("a", st))
        assert common_pb2.ServiceState.Name(pb.state) == f"SERVICE_STATE_{st.name}"
    status = ServiceStatus(
        "db", ServiceState.FAILED, 7, 2, 1, "boom", 5432, "127.0.0.1:41000", ("a", "b")
    )
    pb = convert.service_event_to_pb(ServiceEvent("ws", status, "db: failed", 12)).service
    assert (pb.name, pb.pid, pb.restarts, pb.exit_code, pb.detail) == ("db", 7, 2, 1, "boom")
    assert (pb.port, pb.node_endpoint, list(pb.last_lines)) == (5432, "127.0.0.1:41000", ["a", "b"])


# -- an agent upgraded in place -----------------------------------------------------------


class FakeProvider:
    """What the manager asks of a provider, answered by a FakeEnv (one workspace)."""

    name = "fake"

    def __init__(self, env: FakeEnv) -> None:
        self.env = env
        self.capabilities = Capabilities(long_exec_streams=env.long_exec_streams)

    def exec(
        self, workspace: str, argv: Sequence[str], env: Mapping[str, str] | None = None
    ) -> AsyncIterator[ExecChunk]:
        return self.env.exec(argv, env)

    async def run(
        self, workspace: str, argv: Sequence[str], env: Mapping[str, str] | None = None
    ) -> tuple[int, bytes, bytes]:
        return await self.env.run(argv, env)

    async def inspect(self, workspace: str) -> EnvironmentStatus:
        return EnvironmentStatus(workspace=workspace, provider="fake", state=EnvState.RUNNING)


async def test_an_upgraded_agent_resumes_services_from_the_earlier_format(tmp_path: Path) -> None:
    env = FakeEnv()
    root = tmp_path / "services"
    plain = (ServiceDef("db", ("/usr/bin/db",)), ServiceDef("web", ("/usr/bin/web",), 80, ("db",)))
    old_agent = WorkspaceSupervisor(
        "ws", "fake", env, root / "state" / "ws.json", LogStore(root / "logs" / "ws")
    )
    providers = ProviderSet({"fake": FakeProvider(env)})  # type: ignore[dict-item]
    manager = ServiceManager(root, providers, legacy=convert.service_from_saved_pb)
    try:
        async with asyncio.timeout(WAIT):
            _ = [ev async for ev in old_agent.start(list(plain))]
        await old_agent.close()  # the agent goes away; its services run on
        pids = {p.name: p.pid for p in env.running()}
        assert sorted(pids) == ["db", "web"]
        # ...and the file says what an agent of the earlier format would have written.
        old_agent.state_file.write_bytes(legacy_bytes("fake", plain))

        await manager.resume_all()

        sup = manager.existing("ws")
        assert sup is not None and tuple(sup.services.values()) == plain
        await wait_until(lambda: {n: r.pid for n, r in sup.runners.items()} == pids)
        assert len(env.processes) == 2  # found running again, not started twice
        raw = json.loads(sup.state_file.read_bytes())
        assert raw["format"] == state.FORMAT  # written again in the current format
        assert state.decode(sup.state_file.read_bytes()).services == plain
    finally:
        await manager.close()
        await env.shutdown()


async def test_without_a_decoder_the_earlier_format_is_left_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    env = FakeEnv()
    path = tmp_path / "state" / "ws.json"
    path.parent.mkdir()
    raw = legacy_bytes("fake", (ServiceDef("db", ("/usr/bin/db",)),))
    path.write_bytes(raw)
    manager = ServiceManager(tmp_path, ProviderSet({"fake": FakeProvider(env)}))  # type: ignore[dict-item]
    await manager.resume_all()
    assert manager.existing("ws") is None and path.read_bytes() == raw
    assert "could not resume the services of ws: state saved by an earlier agent" in caplog.text
    await env.shutdown()
