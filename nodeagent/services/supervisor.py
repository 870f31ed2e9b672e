"""Supervise one workspace's services: order, health gates, restart policy, events."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from common.errors import VendettaError
from common.events import EventBus
from nodeagent.services import health, process
from nodeagent.services.logstore import LogStore
from nodeagent.services.model import ServiceEvent, ServiceState, ServiceStatus
from nodeagent.services.process import Env
from nodeagent.services.spec import ServiceDef, injected_env, levels
from nodeagent.services.state import SavedState, StateFile

log = logging.getLogger("vendetta.services")

RESTART_LIMIT = 5
BACKOFF_INITIAL = 1.0
BACKOFF_MAX = 30.0
REPLACE_TIMEOUT = 10.0  # TERM to KILL, for a service stopped because its spec changed
CATCH_UP_TRIES = 20  # after an exit: checks that the tails read all output, 0.05 s apart


class ServiceRunner:
    """One service's life: start, health gate, watch, restart per its policy."""

    def __init__(self, sup: WorkspaceSupervisor, svc: ServiceDef) -> None:
        self.sup = sup
        self.svc = svc
        self.state = ServiceState.PENDING
        self.pid = 0
        self.restarts = 0
        self.exit_code = 0
        self.detail = "waiting for dependencies" if svc.depends_on else ""
        self.settled = asyncio.Event()  # healthy, or given up
        self.stopping = False
        self._stop_timeout = REPLACE_TIMEOUT
        self._woken = asyncio.Event()  # set by stop(): ends a restart backoff at once
        self.task: asyncio.Task[None] | None = None
        self._exit: asyncio.Task[int] | None = None
        self._tails: list[asyncio.Task[None]] = []

    def status(self) -> ServiceStatus:
        failed = self.state == ServiceState.FAILED
        return ServiceStatus(
            name=self.svc.name,
            state=self.state,
            pid=self.pid,
            restarts=self.restarts,
            exit_code=self.exit_code,
            detail=self.detail,
            port=self.svc.port,
            node_endpoint=self.sup.published.get(self.svc.port, ""),
            last_lines=tuple(self.sup.logs.get(self.svc.name).last_lines(10)) if failed else (),
        )

    def set(self, state: ServiceState, detail: str, restarting: bool = False) -> None:
        self.state, self.detail = state, detail
        final = state in (ServiceState.FAILED, ServiceState.EXITED) and not restarting
        if state == ServiceState.HEALTHY or final:
            self.settled.set()
        name = state.value
        self.sup.publish(self, f"{self.svc.name}: {name}" + (f" ({detail})" if detail else ""))

    def launch(self, resume_pid: int = 0) -> None:
        self.task = asyncio.create_task(self._run(resume_pid), name=f"svc-{self.svc.name}")

    def _start_tails(self) -> None:
        if self._tails:
            return
        slog = self.sup.logs.get(self.svc.name)
        follow = process.tail if self.sup.env.long_exec_streams else process.poll_tail
        for stream in ("stdout", "stderr"):
            self._tails.append(
                asyncio.create_task(
                    follow(self.sup.env, self.svc.name, stream, slog.offset(stream), slog.feed)
                )
            )

    async def _signal(self, sig: str) -> None:
        # Never pid 0: kill would signal the whole process group.
        if self.pid > 0:
            await process.signal(self.sup.env, self.pid, sig)

    async def _terminate(self, timeout: float) -> None:
        """TERM the current process, KILL it if it has not exited after ``timeout``."""
        if self.pid and self._exit is not None and not self._exit.done():
            await self._signal("TERM")
            done, _ = await asyncio.wait({self._exit}, timeout=timeout)
            if not done:
                await self._signal("KILL")

    async def _flush_logs(self) -> None:
        """The process has exited: once the tails have read all it wrote, end its last lines."""
        slog = self.sup.logs.get(self.svc.name)
        for _ in range(CATCH_UP_TRIES):
            behind = False
            for stream in ("stdout", "stderr"):
                path = f"{process.service_dir(self.svc.name)}/{stream}"
                with contextlib.suppress(VendettaError):  # is there one byte more?
                    more = await process.read_from(self.sup.env, path, slog.offset(stream), 1)
                    behind = behind or bool(more)
            if not behind:
                break
            await asyncio.sleep(0.05)
        await slog.flush()

    async def _run(self, resume_pid: int) -> None:
        backoff = BACKOFF_INITIAL
        env = injected_env(self.svc, self.sup.services)
        while True:
            if self.stopping:
                self.set(ServiceState.STOPPED, "stopped")
                return
            gave_up = asyncio.Event()
            try:
                if resume_pid:
                    self.pid, resume_pid = resume_pid, 0
                    self._exit = asyncio.create_task(
                        process.watch_exit(self.sup.env, self.svc.name, self.pid)
                    )
                    self.set(ServiceState.STARTING, f"found running again (pid {self.pid})")
                else:
                    self.set(ServiceState.STARTING, "")
                    self.pid, self._exit = await process.start(
                        self.sup.env,
                        self.svc.name,
                        self.svc.argv,
                        env,
                        detached=not self.sup.env.long_exec_streams,
                    )
                self._start_tails()
                if self.stopping:  # stop() came while it was starting, and saw no pid
                    await self._terminate(self._stop_timeout)
                checker = asyncio.create_task(self._health(gave_up))
                try:
                    code = await self._exit
                finally:
                    checker.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await checker
            except VendettaError as exc:
                self.set(ServiceState.FAILED, f"could not start: {exc}")
                return
            self.exit_code, self.pid = code, 0
            await self._flush_logs()
            if self.stopping:
                self.set(ServiceState.STOPPED, f"stopped (exit {code})")
                return
            if gave_up.is_set():
                return  # health never passed: failed, not restarted
            policy = self.svc.restart
            wants = policy == "always" or (policy == "on-failure" and code != 0)
            if not wants:
                state = ServiceState.EXITED if code == 0 else ServiceState.FAILED
                self.set(state, f"exited with code {code}")
                return
            if self.restarts >= RESTART_LIMIT:
                self.set(
                    ServiceState.FAILED,
                    f"exited with code {code}; gave up after {self.restarts} restarts",
                )
                return
            self.restarts += 1
            self.set(
                ServiceState.EXITED,
                f"exited with code {code}; restart {self.restarts}/{RESTART_LIMIT} in {backoff:g}s",
                restarting=True,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._woken.wait(), timeout=backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _health(self, gave_up: asyncio.Event) -> None:
        h = self.svc.health
        if h is None:
            self.set(ServiceState.HEALTHY, "started (no health check)")
            return
        await asyncio.sleep(h.start_period)
        failures, healthy = 0, False
        while True:
            try:
                ok, seen = await health.check(self.sup.env, self.svc)
            except Exception as exc:  # a bug: say so, and keep checking rather than hang
                log.exception("health check of %s", self.svc.name)
                ok, seen = False, f"health check error: {exc!r}"
            if ok:
                failures = 0
                if self.state != ServiceState.HEALTHY:
                    healthy = True
                    self.set(ServiceState.HEALTHY, seen)
            else:
                failures += 1
                if not healthy and failures >= h.retries:
                    gave_up.set()
                    self.set(
                        ServiceState.FAILED,
                        f"health check never passed after {failures} tries: {seen}",
                    )
                    await self._signal("KILL")
                    return
                if healthy and failures >= h.retries and self.state == ServiceState.HEALTHY:
                    self.set(ServiceState.UNHEALTHY, seen)
            await asyncio.sleep(h.interval)

    async def stop(self, timeout: float) -> None:
        self.stopping = True
        self._stop_timeout = timeout
        self._woken.set()
        await self._terminate(timeout)
        if self.task is not None:
            # Enough for a runner that was starting the process to TERM (and KILL) it.
            with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
                await asyncio.wait_for(self.task, timeout=timeout + 5)
            if not self.task.done():
                self.task.cancel()
        if self.state not in (ServiceState.STOPPED,):
            self.set(ServiceState.STOPPED, "stopped")
        await self.cancel_tails()
        with contextlib.suppress(VendettaError):
            await process.stop_tails(self.sup.env, self.svc.name)

    async def cancel_tails(self) -> None:
        for t in self._tails:
            t.cancel()
        await asyncio.gather(*self._tails, return_exceptions=True)
        self._tails = []
        await self.sup.logs.get(self.svc.name).settle()


class WorkspaceSupervisor:
    """All services of one workspace. Its spec is kept on disk so a restarted agent resumes."""

    def __init__(
        self, workspace: str, provider: str, env: Env, state_file: Path, logs: LogStore
    ) -> None:
        self.workspace = workspace
        self.provider = provider
        self.env = env
        self.state_file = state_file
        self.state_store = StateFile(state_file)
        self.logs = logs
        self.services: dict[str, ServiceDef] = {}
        self.runners: dict[str, ServiceRunner] = {}
        self.published: dict[int, str] = {}
        self.events: EventBus[ServiceEvent] = EventBus()
        self._lock = asyncio.Lock()
        self._resuming: asyncio.Task[None] | None = None

    def publish(self, runner: ServiceRunner, message: str) -> None:
        self.events.publish(
            ServiceEvent(
                workspace=self.workspace,
                service=runner.status(),
                message=message,
                time_unix_nano=time.time_ns(),
            )
        )

    def _alive(self, name: str) -> bool:
        r = self.runners.get(name)
        return r is not None and r.task is not None and not r.task.done()

    def statuses(self) -> list[ServiceStatus]:
        return [self.runners[n].status() for n in self.services if n in self.runners]

    async def save(self) -> None:
        """Keep the spec on disk (atomically, off the loop) for a restarted agent."""
        await self.state_store.write(SavedState(self.provider, tuple(self.services.values())))

    async def start(self, services: list[ServiceDef]) -> AsyncIterator[ServiceEvent]:
        """Start in dependency order, each layer in parallel once the previous is healthy."""
        layers = levels(services)
        async with self._lock:
            with self.events.subscribe() as events:
                runner = asyncio.create_task(self._start_layers(services, layers))
                while not runner.done():
                    getter = asyncio.ensure_future(events.get())
                    done, _ = await asyncio.wait(
                        {getter, runner}, return_when=asyncio.FIRST_COMPLETED
                    )
                    if getter in done:
                        yield getter.result()
                    else:
                        getter.cancel()
                await runner
                for ev in events.drain():
                    yield ev
                # Always end with where every service stands (nothing may have changed).
                for st in self.statuses():
                    yield ServiceEvent(
                        workspace=self.workspace,
                        service=st,
                        message="",
                        time_unix_nano=time.time_ns(),
                    )

    async def _start_layers(
        self, services: list[ServiceDef], layers: list[list[ServiceDef]]
    ) -> None:
        await self._stop_resuming()
        new = {s.name: s for s in services}
        keep = {n for n, r in self.runners.items() if self._alive(n) and r.svc == new.get(n)}
        # Services dropped from the spec, or whose spec changed, end before any replacement.
        old = [r for n, r in self.runners.items() if n not in keep]
        await self._stop_runners(old, REPLACE_TIMEOUT, replacing=True)
        for r in old:
            del self.runners[r.svc.name]
        self.services = new
        self.published = await self._published_ports()
        await self.save()
        for s in services:
            if s.name not in keep:
                self.runners[s.name] = ServiceRunner(self, s)
        await self._launch_layers(layers, keep)

    async def _launch_layers(self, layers: list[list[ServiceDef]], skip: set[str]) -> None:
        """Launch each layer's runners once the previous layer has settled; those in
        ``skip`` are already running. A service whose dependency failed is not started."""
        failed: list[str] = []
        for layer in layers:
            for s in layer:
                if s.name in skip:
                    continue
                r = self.runners[s.name]
                blocked = [d for d in s.depends_on if d in failed]
                if blocked:
                    failed.append(s.name)
                    r.set(ServiceState.FAILED, f"not started: {', '.join(blocked)} failed")
                    continue
                r.launch()
            await asyncio.gather(*(self.runners[s.name].settled.wait() for s in layer))
            failed += [
                s.name
                for s in layer
                if self.runners[s.name].state != ServiceState.HEALTHY and s.name not in failed
            ]

    async def _stop_runners(
        self, runners: list[ServiceRunner], timeout: float, replacing: bool = False
    ) -> None:
        """Stop gracefully, dependents first (by the current spec's order).

        ``replacing``: the runners are dropped afterwards, so those already ended
        keep their state and only lose their log tails.
        """
        if not runners:
            return
        by_name = {r.svc.name: r for r in runners}
        layers = levels(list(self.services.values()))
        in_spec = [[s.name for s in layer if s.name in by_name] for layer in reversed(layers)]
        listed = {n for group in in_spec for n in group}
        groups = [[n for n in by_name if n not in listed], *in_spec]
        for group in groups:
            await asyncio.gather(*(self._stop_one(by_name[n], timeout, replacing) for n in group))

    async def _stop_one(self, r: ServiceRunner, timeout: float, replacing: bool) -> None:
        if not replacing or (r.task is not None and not r.task.done()):
            await r.stop(timeout)
        else:  # ended (exited, failed, stopped) or never launched: only its log tails remain
            r.stopping = True
            await r.cancel_tails()
            with contextlib.suppress(VendettaError):
                await process.stop_tails(self.env, r.svc.name)

    async def _published_ports(self) -> dict[int, str]:
        ports: dict[int, str] = {}
        for s in self.services.values():
            for p in s.ports():
                ep = await self.env.endpoint(p, published=True)
                if ep:
                    ports[p] = f"{ep[0]}:{ep[1]}"
        return ports

    async def resume(self) -> None:
        """After an agent restart: find each service's process again, else start it.

        Services still running are watched again at once; the others are started in
        the background, in dependency order as start() does.
        """
        await self._stop_resuming()
        self.published = await self._published_ports()
        await self.save()
        found: set[str] = set()
        self.runners = {}
        for s in self.services.values():
            r = self.runners[s.name] = ServiceRunner(self, s)
            pid = await process.find_running(self.env, s.name)
            if pid:
                r.launch(resume_pid=pid)
                found.add(s.name)
        if len(found) < len(self.services):
            layers = levels(list(self.services.values()))
            self._resuming = asyncio.create_task(
                self._launch_layers(layers, found), name=f"resume-{self.workspace}"
            )

    async def _stop_resuming(self) -> None:
        """start(), stop() and close() take over from a resume still starting services."""
        task, self._resuming = self._resuming, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})

    async def stop(self, timeout: float) -> list[ServiceStatus]:
        """Reverse dependency order, gracefully (TERM, wait, KILL)."""
        async with self._lock:
            await self._stop_resuming()
            await self._stop_runners(list(self.runners.values()), timeout)
            statuses = self.statuses()
            await self.state_store.remove()
            return statuses

    async def close(self) -> None:
        """Stop supervising (agent shutdown): services keep running inside."""
        await self._stop_resuming()
        for r in self.runners.values():
            if r.task is not None:
                r.task.cancel()
            await r.cancel_tails()
        await asyncio.gather(
            *(r.task for r in self.runners.values() if r.task is not None), return_exceptions=True
        )
