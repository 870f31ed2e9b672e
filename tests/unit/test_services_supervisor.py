"""The service supervisor against a FakeEnv that answers its shell protocol.

Most tests run twice: with exec streams that stay open for a service's life
(the wrapper's stream ends with the exit code) and in detached mode (the
wrapper is launched in the background and its pid and exit files are polled).
"""

from __future__ import annotations

import asyncio
import functools
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from common.errors import InvalidArgumentError
from nodeagent.services import process, supervisor
from nodeagent.services.logstore import LogStore
from nodeagent.services.model import ServiceEvent, ServiceState, ServiceStatus
from nodeagent.services.spec import Health, ServiceDef, injected_env, levels
from nodeagent.services.state import StateFile
from nodeagent.services.supervisor import WorkspaceSupervisor
from tests.support.fake_env import KILL_CODE, TERM_CODE, Behaviour, FakeEnv, HealthRule

HEALTHY = ServiceState.HEALTHY
FAILED = ServiceState.FAILED
EXITED = ServiceState.EXITED
STOPPED = ServiceState.STOPPED
WAIT = 5.0


def svc(
    name: str,
    *deps: str,
    port: int = 0,
    health: Health | None = None,
    restart: str = "on-failure",
    env: dict[str, str] | None = None,
) -> ServiceDef:
    return ServiceDef(
        name=name,
        argv=(f"/usr/bin/{name}", "--serve"),
        port=port,
        depends_on=deps,
        health=health,
        env=env or {},
        restart=restart,
    )


def command_check(name: str, retries: int = 50, interval: float = 0.02) -> Health:
    return Health(command=("check-health", name), interval=interval, timeout=1.0, retries=retries)


def graph() -> list[ServiceDef]:
    """db (TCP check), web on db (HTTP check), worker on db and web (command check)."""
    return [
        svc("db", port=5432, health=Health(interval=0.02, timeout=1.0, retries=50)),
        svc("web", "db", port=8080, health=Health(http="/healthz", interval=0.02, retries=50)),
        svc("worker", "db", "web", health=command_check("worker")),
    ]


def graph_rules(env: FakeEnv, fail_first: int = 2) -> None:
    env.health["db"] = HealthRule(fail_first=fail_first, port=5432)
    env.health["web"] = HealthRule(fail_first=fail_first, port=8080)
    env.health["worker"] = HealthRule(fail_first=fail_first)


async def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    async with asyncio.timeout(timeout):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.005)


async def collect(sup: WorkspaceSupervisor, services: list[ServiceDef]) -> list[ServiceEvent]:
    async with asyncio.timeout(WAIT):
        return [ev async for ev in sup.start(services)]


def final(events: list[ServiceEvent]) -> dict[str, ServiceStatus]:
    """Where every service stands at the end of a start() stream."""
    out: dict[str, ServiceStatus] = {}
    for ev in events:
        out[ev.service.name] = ev.service
    return out


def state_of(sup: WorkspaceSupervisor, name: str) -> ServiceState:
    return sup.runners[name].state


@pytest.fixture(autouse=True)
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor, "BACKOFF_INITIAL", 0.01)
    monkeypatch.setattr(supervisor, "BACKOFF_MAX", 0.04)
    # Poll intervals are default arguments, not module constants.
    monkeypatch.setattr(process, "watch_exit", functools.partial(process.watch_exit, interval=0.02))
    monkeypatch.setattr(process, "poll_tail", functools.partial(process.poll_tail, interval=0.02))


@pytest.fixture(params=[True, False], ids=["streams", "detached"])
async def env(request: pytest.FixtureRequest) -> AsyncIterator[FakeEnv]:
    fake = FakeEnv(long_exec_streams=request.param)
    yield fake
    await fake.shutdown()
    assert fake.unknown == [], "the supervisor sent commands the fake does not know"


@pytest.fixture
async def streams_env() -> AsyncIterator[FakeEnv]:
    fake = FakeEnv(long_exec_streams=True)
    yield fake
    await fake.shutdown()
    assert fake.unknown == []


SupFactory = Callable[[FakeEnv], WorkspaceSupervisor]


@pytest.fixture
async def make_sup(tmp_path: Path) -> AsyncIterator[SupFactory]:
    made: list[WorkspaceSupervisor] = []

    def make(env: FakeEnv) -> WorkspaceSupervisor:
        sup = WorkspaceSupervisor(
            "ws", "fake", env, tmp_path / "state" / "ws.json", LogStore(tmp_path / "logs")
        )
        made.append(sup)
        return sup

    yield make
    for sup in made:
        await sup.close()


# -- spec ----------------------------------------------------------------------------


def test_levels_are_topological_layers_with_parallel_siblings() -> None:
    services = [
        svc("app", "api", "cache"),
        svc("db"),
        svc("api", "db"),
        svc("cache"),
        svc("jobs", "db"),
    ]
    layers = [[s.name for s in layer] for layer in levels(services)]
    assert layers == [["db", "cache"], ["api", "jobs"], ["app"]]
    assert levels([]) == []


def test_levels_unknown_dependency() -> None:
    with pytest.raises(InvalidArgumentError) as exc:
        levels([svc("db"), svc("web", "db", "redis")])
    assert str(exc.value) == "service 'web' depends on unknown 'redis'"


def test_levels_cycle_names_the_services_in_it() -> None:
    with pytest.raises(InvalidArgumentError) as exc:
        levels([svc("a", "c"), svc("b", "a"), svc("c", "b"), svc("free")])
    assert str(exc.value) == "services have a dependency cycle among: a, b, c"
    with pytest.raises(InvalidArgumentError, match="cycle among: self"):
        levels([svc("self", "self")])


def test_injected_env() -> None:
    services = {
        "my-db": svc("my-db", port=5432),
        "queue": svc("queue"),  # no port: nothing to inject
        "api": svc("api", port=8080),
        "web": svc(
            "web",
            "my-db",
            "queue",
            "api",
            env={"VENDETTA_SERVICE_API_URL": "http://api.internal", "DEBUG": "1"},
        ),
    }
    assert injected_env(services["web"], services) == {
        "VENDETTA_SERVICE_MY_DB_PORT": "5432",
        "VENDETTA_SERVICE_MY_DB_URL": "http://localhost:5432",
        "VENDETTA_SERVICE_API_PORT": "8080",
        "VENDETTA_SERVICE_API_URL": "http://api.internal",  # the service's own env wins
        "DEBUG": "1",
    }
    assert injected_env(services["my-db"], services) == {}


# -- start ---------------------------------------------------------------------------


async def test_start_waits_for_each_layer_to_be_healthy(env: FakeEnv, make_sup: SupFactory) -> None:
    sup = make_sup(env)
    graph_rules(env, fail_first=2)
    env.observe = lambda: {n: r.state for n, r in sup.runners.items()}

    events = await collect(sup, graph())

    db, web, worker = (env.starts(n) for n in ("db", "web", "worker"))
    assert (len(db), len(web), len(worker)) == (1, 1, 1)
    assert db[0].order < web[0].order < worker[0].order
    assert isinstance(web[0].observed, dict) and isinstance(worker[0].observed, dict)
    assert web[0].observed["db"] == HEALTHY
    assert worker[0].observed["web"] == HEALTHY
    # Each passed its gate on its third check, through the inside TCP/HTTP/command checks.
    assert [p.checks >= 3 for p in (db[0], web[0], worker[0])] == [True] * 3
    assert {n: st.state for n, st in final(events).items()} == dict.fromkeys(
        ["db", "web", "worker"], HEALTHY
    )
    assert final(events)["web"].pid == web[0].pid
    assert web[0].argv == ("/usr/bin/web", "--serve")
    assert web[0].env == {
        "VENDETTA_SERVICE_DB_PORT": "5432",
        "VENDETTA_SERVICE_DB_URL": "http://localhost:5432",
    }
    messages = [ev.message for ev in events if ev.message]
    assert messages.index("db: healthy (port 5432 (inside) accepts connections)") < messages.index(
        "web: starting"
    )
    assert "web: healthy (GET /healthz (inside): ok)" in messages
    assert (Path(sup.state_file)).exists()


async def test_siblings_start_concurrently(env: FakeEnv, make_sup: SupFactory) -> None:
    sup = make_sup(env)
    env.health["a"] = HealthRule(fail_first=1)  # healthy on the 2nd check
    env.health["b"] = HealthRule(fail_first=1)
    env.observe = lambda: {n: r.state for n, r in sup.runners.items()}

    events = await collect(
        sup, [svc("a", health=command_check("a")), svc("b", health=command_check("b"))]
    )

    (a,), (b,) = env.starts("a"), env.starts("b")
    assert isinstance(a.observed, dict) and isinstance(b.observed, dict)
    assert b.observed.get("a") != HEALTHY  # b started while a was still in its gate
    assert a.observed.get("b") != HEALTHY
    assert {st.state for st in final(events).values()} == {HEALTHY}


async def test_a_check_the_engine_fails_counts_as_a_failed_check(
    env: FakeEnv, make_sup: SupFactory
) -> None:
    """An engine error in a check (LXD dropping an exec) is one failed try: the
    checker goes on, instead of dying and leaving the service starting forever."""
    sup = make_sup(env)
    env.health["a"] = HealthRule(fail_first=0, engine_errors=3)
    events = await collect(sup, [svc("a", health=command_check("a", retries=5))])
    assert final(events)["a"].state == HEALTHY
    messages = [ev.message for ev in events]
    assert "a: healthy (check command exited 0: ok)" in messages, messages

    env.health["b"] = HealthRule(fail_first=0, engine_errors=10)
    events = await collect(sup, [svc("b", health=command_check("b", retries=3))])
    st = final(events)["b"]
    assert st.state == FAILED
    assert st.detail == (
        "health check never passed after 3 tries: could not run the check: "
        "the engine dropped the exec (simulated)"
    )


async def test_health_gate_failure_fails_service_and_dependents(
    env: FakeEnv, make_sup: SupFactory
) -> None:
    sup = make_sup(env)
    env.health["db"] = HealthRule(fail_first=None)
    env.behave("db", Behaviour(stdout=b"db: booting\ndb: cannot open data dir\n"))
    services = [
        svc("db", health=command_check("db", retries=3)),
        svc("web", "db"),
        svc("worker", "db", "web"),
    ]

    events = await collect(sup, services)

    st = final(events)
    assert st["db"].state == FAILED
    assert (
        st["db"].detail
        == "health check never passed after 3 tries: check command exited 1: not yet"
    )
    assert env.signals_of("db") == ["KILL"]
    assert st["web"].state == FAILED and st["web"].detail == "not started: db failed"
    assert st["worker"].state == FAILED and st["worker"].detail == "not started: db, web failed"
    assert env.starts("web") == [] and env.starts("worker") == []
    # Killed, and not restarted although the policy is on-failure and it exited 137.
    await wait_until(lambda: sup.runners["db"].task is not None and sup.runners["db"].task.done())
    await asyncio.sleep(0.1)
    assert len(env.starts("db")) == 1
    assert state_of(sup, "db") == FAILED
    assert sup.runners["db"].exit_code == KILL_CODE
    assert sup.runners["db"].restarts == 0
    # A failed service's status carries the end of its output.
    await wait_until(lambda: "db: cannot open data dir" in sup.runners["db"].status().last_lines)


# -- restarts --------------------------------------------------------------------------


async def test_on_failure_restarts_after_nonzero_exit(env: FakeEnv, make_sup: SupFactory) -> None:
    sup = make_sup(env)
    env.behave("api", Behaviour(exit_after=0.03, exit_code=3), Behaviour())
    with sup.events.subscribe() as sub:
        await collect(sup, [svc("api")])
        await wait_until(lambda: len(env.starts("api")) == 2 and state_of(sup, "api") == HEALTHY)
        messages = [ev.message for ev in sub.drain()]
    assert sup.runners["api"].restarts == 1
    assert sup.runners["api"].pid == env.starts("api")[1].pid
    assert "api: exited (exited with code 3; restart 1/5 in 0.01s)" in messages
    await asyncio.sleep(0.1)
    assert len(env.starts("api")) == 2


async def test_on_failure_does_not_restart_after_exit_zero(
    env: FakeEnv, make_sup: SupFactory
) -> None:
    sup = make_sup(env)
    env.behave("migrate", Behaviour(exit_after=0.02, exit_code=0))
    await collect(sup, [svc("migrate")])
    await wait_until(lambda: state_of(sup, "migrate") == EXITED)
    await asyncio.sleep(0.15)  # many backoffs long
    assert len(env.starts("migrate")) == 1
    r = sup.runners["migrate"]
    assert (r.state, r.detail, r.restarts, r.pid) == (EXITED, "exited with code 0", 0, 0)


async def test_always_restarts_after_exit_zero(env: FakeEnv, make_sup: SupFactory) -> None:
    sup = make_sup(env)
    env.behave("tick", Behaviour(exit_after=0.02, exit_code=0), Behaviour())
    await collect(sup, [svc("tick", restart="always")])
    await wait_until(lambda: len(env.starts("tick")) == 2 and state_of(sup, "tick") == HEALTHY)
    assert sup.runners["tick"].restarts == 1


async def test_restart_no_never_restarts(env: FakeEnv, make_sup: SupFactory) -> None:
    sup = make_sup(env)
    env.behave("once", Behaviour(exit_after=0.02, exit_code=2))
    await collect(sup, [svc("once", restart="no")])
    await wait_until(lambda: state_of(sup, "once") == FAILED)
    await asyncio.sleep(0.15)
    assert len(env.starts("once")) == 1
    r = sup.runners["once"]
    assert (r.detail, r.restarts, r.exit_code) == ("exited with code 2", 0, 2)


async def test_restart_limit(env: FakeEnv, make_sup: SupFactory) -> None:
    sup = make_sup(env)
    env.behave("crashy", Behaviour(exit_after=0.02, exit_code=1, stderr=b"boom\n"))
    env.health["crashy"] = HealthRule(fail_first=None)
    # A health gate that has not passed keeps start() streaming through the restarts.
    events = await collect(
        sup, [svc("crashy", health=command_check("crashy", retries=1000, interval=10))]
    )

    assert len(env.starts("crashy")) == 1 + supervisor.RESTART_LIMIT
    st = final(events)["crashy"]
    assert st.state == FAILED
    assert st.detail == "exited with code 1; gave up after 5 restarts"
    assert st.restarts == 5 and st.exit_code == 1
    restart_events = [ev for ev in events if "restart " in ev.message]
    found = [re.search(r"restart (\d)/5 in ([\d.]+)s", ev.message) for ev in restart_events]
    assert [int(m.group(1)) for m in found if m] == [1, 2, 3, 4, 5]
    assert [float(m.group(2)) for m in found if m] == [0.01, 0.02, 0.04, 0.04, 0.04]
    assert [ev.service.restarts for ev in restart_events] == [1, 2, 3, 4, 5]
    assert all(ev.service.state == EXITED for ev in restart_events)
    await asyncio.sleep(0.1)
    assert len(env.starts("crashy")) == 6


async def test_failed_service_last_lines_include_an_unterminated_line(
    env: FakeEnv, make_sup: SupFactory
) -> None:
    sup = make_sup(env)
    # It prints and exits at once: its exit may be seen before its output is read.
    env.behave("cfg", Behaviour(exit_after=0, exit_code=2, stderr=b"loading\nfatal: no config"))
    await collect(sup, [svc("cfg", restart="no")])
    await wait_until(lambda: state_of(sup, "cfg") == FAILED)
    assert sup.runners["cfg"].status().last_lines[-2:] == ("loading", "fatal: no config")


# -- stop ------------------------------------------------------------------------------


async def test_stop_in_reverse_order_term_then_kill(env: FakeEnv, make_sup: SupFactory) -> None:
    sup = make_sup(env)
    graph_rules(env, fail_first=0)
    env.behave("web", Behaviour(ignore_term=True))
    await collect(sup, graph())
    assert sup.state_file.exists()
    pids = {n: env.starts(n)[0].pid for n in ("db", "web", "worker")}

    t0 = time.monotonic()
    statuses = await sup.stop(timeout=0.2)
    took = time.monotonic() - t0

    assert env.signals == [
        ("worker", pids["worker"], "TERM"),
        ("web", pids["web"], "TERM"),
        ("web", pids["web"], "KILL"),
        ("db", pids["db"], "TERM"),
    ]
    assert took >= 0.2
    assert env.running() == []
    assert {s.name: s.state for s in statuses} == dict.fromkeys(["db", "web", "worker"], STOPPED)
    details = {s.name: s.detail for s in statuses}
    assert details["db"] == f"stopped (exit {TERM_CODE})"
    assert details["web"] == f"stopped (exit {KILL_CODE})"
    assert not sup.state_file.exists()
    await asyncio.sleep(0.1)
    assert len(env.processes) == 3  # nothing restarted after the stop


async def test_stop_of_exited_and_blocked_services(env: FakeEnv, make_sup: SupFactory) -> None:
    sup = make_sup(env)
    env.behave("job", Behaviour(exit_after=0.01, exit_code=0))
    env.health["bad"] = HealthRule(fail_first=None)
    await collect(
        sup, [svc("job"), svc("bad", health=command_check("bad", retries=2)), svc("after", "bad")]
    )
    await wait_until(lambda: state_of(sup, "job") == EXITED)
    statuses = await sup.stop(timeout=0.2)
    assert {s.name: s.state for s in statuses} == dict.fromkeys(["job", "bad", "after"], STOPPED)
    assert env.signals_of("job") == []
    assert env.starts("after") == []


# -- idempotence and resume ----------------------------------------------------------------


async def test_start_again_leaves_running_services_alone(
    env: FakeEnv, make_sup: SupFactory
) -> None:
    sup = make_sup(env)
    graph_rules(env, fail_first=0)
    await collect(sup, graph())
    pids = {n: env.starts(n)[0].pid for n in ("db", "web", "worker")}

    events = await collect(sup, graph())

    assert len(env.processes) == 3
    st = final(events)
    assert {n: (s.state, s.pid) for n, s in st.items()} == {
        n: (HEALTHY, pid) for n, pid in pids.items()
    }
    # The stream ends with one status per service.
    assert sorted(ev.service.name for ev in events[-3:]) == ["db", "web", "worker"]


async def test_resume_finds_running_services_and_restarts_dead_ones(
    env: FakeEnv, make_sup: SupFactory, tmp_path: Path
) -> None:
    sup1 = make_sup(env)
    graph_rules(env, fail_first=0)
    env.behave("db", Behaviour(stdout=b"db ready\n"))
    await collect(sup1, graph())
    await wait_until(lambda: sup1.logs.get("db").last_lines() == ["db ready"])
    old = {n: env.starts(n)[0].pid for n in ("db", "web", "worker")}
    await sup1.close()  # the agent goes away; services keep running
    assert len(env.running()) == 3
    env.crash("worker", 1)  # and one dies meanwhile

    sup2 = make_sup(env)
    saved = await StateFile(sup2.state_file).read()
    assert saved.provider == "fake" and list(saved.services) == graph()
    sup2.services = {s.name: s for s in saved.services}
    await sup2.resume()
    await wait_until(lambda: all(r.state == HEALTHY for r in sup2.runners.values()))

    assert len(env.starts("db")) == 1 and len(env.starts("web")) == 1
    assert sup2.runners["db"].pid == old["db"] and sup2.runners["web"].pid == old["web"]
    assert len(env.starts("worker")) == 2
    assert sup2.runners["worker"].pid == env.starts("worker")[1].pid != old["worker"]
    # Logs continue from where the last agent run got to: nothing read twice.
    env.write("db", "stdout", b"checkpoint\n")
    await wait_until(lambda: "checkpoint" in sup2.logs.get("db").last_lines())
    assert sup2.logs.get("db").last_lines() == ["db ready", "checkpoint"]
    # A resumed service is still watched: its exit is noticed and it is restarted.
    env.crash("db", 1)
    await wait_until(lambda: len(env.starts("db")) == 2 and state_of(sup2, "db") == HEALTHY)
    assert sup2.runners["db"].restarts == 1
    await sup2.stop(timeout=0.2)
    assert env.running() == []


# -- bugs --------------------------------------------------------------------------------


async def test_stop_during_restart_backoff(
    streams_env: FakeEnv, make_sup: SupFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = streams_env
    monkeypatch.setattr(supervisor, "BACKOFF_INITIAL", 0.3)
    sup = make_sup(env)
    env.behave("tick", Behaviour(exit_after=0.15, exit_code=0), Behaviour())
    await collect(sup, [svc("tick", restart="always")])
    assert sup.runners["tick"].restarts == 0
    await wait_until(lambda: sup.runners["tick"].restarts == 1)  # now in its 0.3 s backoff
    stop = asyncio.create_task(sup.stop(timeout=0.2))
    try:
        async with asyncio.timeout(1.0):
            statuses = await stop
    finally:
        stop.cancel()
    assert [s.state for s in statuses] == [STOPPED]
    assert len(env.starts("tick")) == 1
    assert env.running() == []


async def test_start_with_changed_spec_replaces_the_process(
    streams_env: FakeEnv, make_sup: SupFactory
) -> None:
    env = streams_env
    sup = make_sup(env)
    await collect(sup, [svc("web")])
    changed = ServiceDef(name="web", argv=("/usr/bin/web", "--port", "9090"))
    await collect(sup, [changed])
    assert len(env.starts("web")) == 2
    assert [p.argv for p in env.running()] == [("/usr/bin/web", "--port", "9090")]


async def test_service_removed_from_spec_is_stopped(
    streams_env: FakeEnv, make_sup: SupFactory
) -> None:
    env = streams_env
    sup = make_sup(env)
    await collect(sup, [svc("web"), svc("old")])
    await collect(sup, [svc("web")])
    await sup.stop(timeout=0.2)
    assert env.running() == []


async def test_resume_restarts_dead_services_in_dependency_order(
    streams_env: FakeEnv, make_sup: SupFactory
) -> None:
    env = streams_env
    sup1 = make_sup(env)
    graph_rules(env, fail_first=0)
    await collect(sup1, graph())
    await sup1.close()
    env.crash("db", 1)
    env.crash("web", 1)
    env.health["db"].fail_first = 2

    sup2 = make_sup(env)
    sup2.services = {s.name: s for s in (await StateFile(sup2.state_file).read()).services}
    env.observe = lambda: {n: r.state for n, r in sup2.runners.items()}
    await sup2.resume()
    await wait_until(lambda: all(r.state == HEALTHY for r in sup2.runners.values()))
    web = env.starts("web")[1]
    assert isinstance(web.observed, dict)
    assert web.observed["db"] == HEALTHY


async def test_start_stops_dropped_services_at_once_dependents_first(
    streams_env: FakeEnv, make_sup: SupFactory
) -> None:
    env = streams_env
    sup = make_sup(env)
    await collect(sup, [svc("db"), svc("api", "db"), svc("web")])
    web = env.starts("web")[0].pid
    events = await collect(sup, [svc("web")])
    assert [p.name for p in env.running()] == ["web"]
    assert [(n, sig) for n, _, sig in env.signals] == [("api", "TERM"), ("db", "TERM")]
    assert final(events)["web"].state == HEALTHY and final(events)["web"].pid == web
    assert list(sup.runners) == ["web"] and [s.name for s in sup.statuses()] == ["web"]


async def test_resume_does_not_start_services_whose_dependency_fails(
    streams_env: FakeEnv, make_sup: SupFactory
) -> None:
    env = streams_env
    services = [svc("db", health=command_check("db", retries=3)), svc("web", "db")]
    sup1 = make_sup(env)
    await collect(sup1, services)
    await sup1.close()
    env.crash("db", 1)
    env.crash("web", 1)
    env.health["db"] = HealthRule(fail_first=None)

    sup2 = make_sup(env)
    sup2.services = {s.name: s for s in services}
    await sup2.resume()
    await wait_until(lambda: state_of(sup2, "web") == FAILED)
    assert sup2.runners["web"].detail == "not started: db failed"
    assert state_of(sup2, "db") == FAILED
    assert len(env.starts("db")) == 2 and len(env.starts("web")) == 1
    statuses = await sup2.stop(timeout=0.2)
    assert {s.name: s.state for s in statuses} == {"db": STOPPED, "web": STOPPED}
    assert env.running() == []


async def test_stop_while_a_restart_is_starting_ends_the_new_process(
    streams_env: FakeEnv, make_sup: SupFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = streams_env
    sup = make_sup(env)
    env.behave("tick", Behaviour(exit_after=0.05, exit_code=0), Behaviour())
    await collect(sup, [svc("tick", restart="always")])
    entered, release = asyncio.Event(), asyncio.Event()
    real_start = process.start

    async def slow_start(*args: Any, **kwargs: Any) -> tuple[int, asyncio.Task[int]]:
        entered.set()
        await release.wait()
        return await real_start(*args, **kwargs)

    monkeypatch.setattr(process, "start", slow_start)
    async with asyncio.timeout(WAIT):
        await entered.wait()  # the restart is under way: no pid to signal yet
        stop = asyncio.create_task(sup.stop(timeout=0.2))
        await asyncio.sleep(0.05)
        release.set()
        statuses = await stop
    second = env.starts("tick")[1]
    assert env.signals == [("tick", second.pid, "TERM")]
    assert env.running() == []
    assert [s.state for s in statuses] == [STOPPED]


async def test_a_polled_backlog_is_read_in_pieces_one_after_the_other(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(process, "POLL_MAX", 1000)
    env = FakeEnv(long_exec_streams=False)
    path = f"{process.service_dir('chatty')}/stdout"
    env.files[path] = bytes(range(256)) * 40  # 10,240 bytes waiting
    pieces: list[bytes] = []

    async def feed(stream: str, data: bytes) -> None:
        pieces.append(data)

    # An interval far longer than the test: only reading on at once can finish it.
    task = asyncio.create_task(process.poll_tail(env, "chatty", "stdout", 240, feed, interval=60))
    try:
        await wait_until(lambda: sum(map(len, pieces)) >= 10_000)
    finally:
        task.cancel()
    assert b"".join(pieces) == env.files[path][240:]
    assert [len(p) for p in pieces] == [1000] * 10
