"""An in-memory environment that answers the shell protocol of ``nodeagent.services``.

:class:`FakeEnv` implements ``nodeagent.services.process.Env``. It does not run a
shell: it recognises the exact argv that ``process.py`` and ``health.py`` send
(the service wrapper, in streamed and detached form, ``rm``/``cat`` of the pid
and exit files, ``kill``, ``tail``, the tail clean-up scripts and the health
checks) and simulates them over a dict "filesystem" and fake processes whose
behaviour the test chooses per service (:class:`Behaviour`) and per health
check (:class:`HealthRule`). Anything else it is sent is recorded in
``unknown`` (and answered with exit 127) so tests can assert nothing slipped by.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from common.errors import EngineUnavailableError
from nodeagent.services import process
from providers.base import ExecChunk

TERM_CODE = 128 + 15
KILL_CODE = 128 + 9


@dataclass(frozen=True)
class Behaviour:
    """What one run of a service's fake process does."""

    exit_after: float | None = None  # None: runs until signalled
    exit_code: int = 0
    ignore_term: bool = False  # then only KILL ends it
    stdout: bytes = b""  # written at start
    stderr: bytes = b""


RUNS_FOREVER = Behaviour()


@dataclass
class HealthRule:
    """Answers of a service's health check, counted per process run.

    The check fails ``fail_first`` times, then passes (``None``: never passes).
    A check of a service with no live process always fails.
    """

    fail_first: int | None = 0
    port: int = 0
    # Before answering, this many checks fail in the engine (the exec raises).
    engine_errors: int = 0


@dataclass
class FakeProcess:
    name: str
    pid: int
    argv: tuple[str, ...]
    env: dict[str, str]
    behaviour: Behaviour
    order: int  # global start order
    started_at: float
    observed: object = None  # what env.observe() returned when it started
    signals: list[str] = field(default_factory=list)
    exit_code: int | None = None
    checks: int = 0
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return self.exit_code is None


@dataclass
class _Tail:
    pid: int
    path: str
    ended: asyncio.Event = field(default_factory=asyncio.Event)


_WGET = re.compile(r"^http://127\.0\.0\.1:(\d+)(/.*)?$")
_TCP = re.compile(r"/dev/tcp/127\.0\.0\.1/(\d+)\)")
_TAIL_PID = re.compile(r"cat (\S+)/tail-(\S+?)\.pid")


class FakeEnv:
    """Fake environment; see the module docstring."""

    def __init__(self, long_exec_streams: bool = True) -> None:
        self.long_exec_streams = long_exec_streams
        self.files: dict[str, bytes] = {}
        self.behaviours: dict[str, list[Behaviour]] = {}
        self.health: dict[str, HealthRule] = {}
        self.processes: list[FakeProcess] = []  # every process ever started, in order
        self.signals: list[tuple[str, int, str]] = []  # (service, pid, signal), in order
        self.unknown: list[tuple[str, ...]] = []
        self.commands: list[tuple[str, ...]] = []
        self.observe: Callable[[], object] | None = None
        self._pids = itertools.count(1000)
        self._tails: dict[int, _Tail] = {}

    # -- what tests set up and look at ---------------------------------------------

    def behave(self, name: str, *runs: Behaviour) -> None:
        """Successive runs of ``name`` behave like ``runs``; the last one repeats."""
        self.behaviours[name] = list(runs)

    def starts(self, name: str) -> list[FakeProcess]:
        return [p for p in self.processes if p.name == name]

    def current(self, name: str) -> FakeProcess | None:
        procs = self.starts(name)
        return procs[-1] if procs else None

    def running(self) -> list[FakeProcess]:
        return [p for p in self.processes if p.alive]

    def signals_of(self, name: str) -> list[str]:
        return [sig for n, _, sig in self.signals if n == name]

    def crash(self, name: str, code: int = 1) -> None:
        """The current process of ``name`` dies on its own."""
        proc = self.current(name)
        assert proc is not None and proc.alive
        self._finish(proc, code)

    def write(self, name: str, stream: str, data: bytes) -> None:
        """The service prints ``data``."""
        self._append(f"{process.service_dir(name)}/{stream}", data)

    async def shutdown(self) -> None:
        for p in self.processes:
            if p.task is not None:
                p.task.cancel()
        await asyncio.gather(
            *(p.task for p in self.processes if p.task is not None), return_exceptions=True
        )
        for t in self._tails.values():
            t.ended.set()

    # -- the Env protocol ------------------------------------------------------------

    async def endpoint(self, port: int, published: bool = False) -> tuple[str, int] | None:
        return None  # health checks of ports run inside, through exec

    def exec(
        self, argv: Sequence[str], env: Mapping[str, str] | None = None
    ) -> AsyncIterator[ExecChunk]:
        return self._exec(tuple(argv), dict(env or {}))

    async def run(
        self, argv: Sequence[str], env: Mapping[str, str] | None = None
    ) -> tuple[int, bytes, bytes]:
        out, err, code = b"", b"", -1
        async for chunk in self.exec(argv, env):
            out, err = out + chunk.stdout, err + chunk.stderr
            code = chunk.exit_code if chunk.exit_code is not None else code
        return code, out, err

    async def _exec(self, argv: tuple[str, ...], env: dict[str, str]) -> AsyncIterator[ExecChunk]:
        self.commands.append(argv)
        await asyncio.sleep(0)  # an exec is never synchronous
        if argv[:3] == ("sh", "-c", process._WRAPPER) and argv[3] == "vendetta-svc":
            proc = self._spawn(argv[4], argv[5:], env)
            await proc.exited.wait()
            assert proc.exit_code is not None
            yield ExecChunk(exit_code=proc.exit_code)
            return
        if (
            argv[:2] == ("sh", "-c")
            and argv[2].startswith("setsid sh -c")
            and argv[3] == process._WRAPPER
            and argv[4] == "vendetta-svc"
        ):
            self._spawn(argv[5], argv[6:], env)
            yield ExecChunk(exit_code=0)
            return
        if argv[:2] == ("sh", "-c") and argv[2] == process._TAIL:
            d, stream, start = argv[4], argv[5], int(argv[6])
            async for chunk in self._follow(f"{d}/{stream}", f"{d}/tail-{stream}.pid", start):
                yield chunk
            return
        if argv[:2] == ("sh", "-c") and 'kill "$(cat ' in argv[2]:
            for d, stream in _TAIL_PID.findall(argv[2]):
                for s in ("stdout", "stderr") if stream == "$s" else (stream,):
                    pid = self.files.get(f"{d}/tail-{s}.pid", b"").strip()
                    tail = self._tails.get(int(pid)) if pid.isdigit() else None
                    if tail is not None:
                        tail.ended.set()
            yield ExecChunk(exit_code=0)
            return
        if argv[:2] == ("rm", "-f"):
            for path in argv[2:]:
                self.files.pop(path, None)
            yield ExecChunk(exit_code=0)
            return
        if argv[0] == "cat" and len(argv) == 2:
            if argv[1] in self.files:
                yield ExecChunk(stdout=self.files[argv[1]], exit_code=0)
            else:
                yield ExecChunk(stderr=b"cat: No such file or directory\n", exit_code=1)
            return
        if argv[0] == "kill" and len(argv) == 3 and argv[2].isdigit():
            yield ExecChunk(exit_code=self._kill(argv[1].removeprefix("-"), int(argv[2])))
            return
        if argv[:2] == ("tail", "-c") and len(argv) == 4 and argv[2].startswith("+"):
            if argv[3] not in self.files:
                yield ExecChunk(stderr=b"tail: no such file\n", exit_code=1)
            else:
                yield ExecChunk(stdout=self.files[argv[3]][int(argv[2][1:]) - 1 :], exit_code=0)
            return
        if argv[:4] == ("sh", "-c", process.READ_FROM, "vendetta-read") and len(argv) == 7:
            path, start, most = argv[4], int(argv[5]), int(argv[6])
            data = self.files.get(path, b"")[start - 1 : start - 1 + most]
            yield ExecChunk(stdout=data, exit_code=0)  # the pipeline's status is head's
            return
        if argv[0] == "wget" and argv[1:4] == ("-q", "-O", "/dev/null"):
            m = _WGET.match(argv[4])
            ok = m is not None and self._check_port(int(m.group(1)))
            yield ExecChunk(
                stderr=b"" if ok else b"wget: can't connect to remote host\n",
                exit_code=0 if ok else 1,
            )
            return
        if argv[:2] == ("sh", "-c") and "/dev/tcp/" in argv[2]:
            m = _TCP.search(argv[2])
            ok = m is not None and self._check_port(int(m.group(1)))
            yield ExecChunk(exit_code=0 if ok else 1)
            return
        if argv[0] == "check-health" and len(argv) == 2:
            rule = self.health.get(argv[1], HealthRule())
            if rule.engine_errors > 0:
                rule.engine_errors -= 1
                raise EngineUnavailableError("the engine dropped the exec (simulated)")
            ok = self._check(argv[1])
            yield ExecChunk(stdout=b"ok\n" if ok else b"not yet\n", exit_code=0 if ok else 1)
            return
        self.unknown.append(argv)
        yield ExecChunk(stderr=b"sh: not found\n", exit_code=127)

    # -- the simulation ----------------------------------------------------------------

    def _spawn(self, d: str, argv: Sequence[str], env: dict[str, str]) -> FakeProcess:
        name = d.removeprefix(process.SVC_ROOT + "/")
        runs = self.behaviours.get(name, [RUNS_FOREVER])
        n = len(self.starts(name))
        loop = asyncio.get_running_loop()
        proc = FakeProcess(
            name=name,
            pid=next(self._pids),
            argv=tuple(argv),
            env=env,
            behaviour=runs[min(n, len(runs) - 1)],
            order=len(self.processes),
            started_at=loop.time(),
            observed=self.observe() if self.observe is not None else None,
        )
        self.processes.append(proc)
        # What the wrapper does: fresh pid and exit files, output files, then the pid.
        self.files.pop(f"{d}/exit", None)
        self.files.setdefault(f"{d}/stdout", b"")
        self.files.setdefault(f"{d}/stderr", b"")
        self.files[f"{d}/pid"] = f"{proc.pid}\n".encode()
        proc.task = asyncio.create_task(self._live(proc, d))
        return proc

    async def _live(self, proc: FakeProcess, d: str) -> None:
        b = proc.behaviour
        if b.stdout:
            self._append(f"{d}/stdout", b.stdout)
        if b.stderr:
            self._append(f"{d}/stderr", b.stderr)
        if b.exit_after is None:
            await asyncio.Event().wait()
        await asyncio.sleep(b.exit_after or 0)
        self._finish(proc, b.exit_code)

    def _finish(self, proc: FakeProcess, code: int) -> None:
        if not proc.alive:
            return
        proc.exit_code = code
        if proc.task is not None and proc.task is not asyncio.current_task():
            proc.task.cancel()
        d = process.service_dir(proc.name)
        self.files[f"{d}/exit"] = f"{code}\n".encode()
        proc.exited.set()

    def _kill(self, sig: str, pid: int) -> int:
        proc = next((p for p in self.processes if p.pid == pid), None)
        if proc is None or not proc.alive:
            return 1
        if sig == "0":
            return 0
        self.signals.append((proc.name, pid, sig))
        proc.signals.append(sig)
        if sig == "KILL" or (sig == "TERM" and not proc.behaviour.ignore_term):
            self._finish(proc, KILL_CODE if sig == "KILL" else TERM_CODE)
        return 0

    def _check(self, name: str) -> bool:
        rule = self.health.get(name, HealthRule())
        proc = self.current(name)
        if proc is None or not proc.alive:
            return False
        proc.checks += 1
        return rule.fail_first is not None and proc.checks > rule.fail_first

    def _check_port(self, port: int) -> bool:
        for name, rule in self.health.items():
            if rule.port == port:
                return self._check(name)
        return False

    def _append(self, path: str, data: bytes) -> None:
        self.files[path] = self.files.get(path, b"") + data

    async def _follow(self, path: str, pid_file: str, start: int) -> AsyncIterator[ExecChunk]:
        tail = _Tail(pid=next(self._pids), path=path)
        self._tails[tail.pid] = tail
        self.files[pid_file] = f"{tail.pid}\n".encode()
        offset = start - 1
        try:
            while not tail.ended.is_set():
                data = self.files.get(path, b"")[offset:]
                if data:
                    offset += len(data)
                    yield ExecChunk(stdout=data)
                    continue
                await asyncio.sleep(0.01)  # like tail -F's polling, only faster
            yield ExecChunk(exit_code=TERM_CODE)
        finally:
            self._tails.pop(tail.pid, None)
