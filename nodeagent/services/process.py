"""A service's process inside an environment, driven through exec only.

The wrapper runs the command in the background with its output appended to
files, records its pid, waits for it and records the exit code. The agent
follows the files with ``tail -F`` (whose own pid is recorded so it can be
ended) and learns about exits from the wrapper's exec stream, or, after an
agent restart, by polling the exit file.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Protocol

from common.errors import VendettaError
from providers.base import ExecChunk

SVC_ROOT = "/tmp/.vendetta/svc"

_WRAPPER = """
d="$1"; shift
mkdir -p "$d" && rm -f "$d/exit" "$d/pid" && : >>"$d/stdout" && : >>"$d/stderr"
# setsid where there is one: an engine that kills what an exec left behind
# (LXD does) must not take services down with an agent that restarts.
if command -v setsid >/dev/null 2>&1; then
  setsid "$@" >>"$d/stdout" 2>>"$d/stderr" </dev/null &
else
  "$@" >>"$d/stdout" 2>>"$d/stderr" </dev/null &
fi
pid=$!
echo "$pid" >"$d/pid"
wait "$pid"
code=$?
echo "$code" >"$d/exit"
exit "$code"
"""

# Bytes from offset $2 (1-based) of file $1, at most $3 of them.
READ_FROM = 'tail -c "+$2" "$1" | head -c "$3"'
POLL_MAX = 4 * 1024 * 1024

_TAIL = """
echo $$ >"$1/tail-$2.pid"
exec tail -c "+$3" -F "$1/$2" 2>/dev/null
"""


class Env(Protocol):
    """What the supervisor needs of an environment (a provider, bound to a workspace)."""

    # Whether exec streams may stay open for a service's lifetime (see Capabilities).
    long_exec_streams: bool

    def exec(
        self, argv: Sequence[str], env: Mapping[str, str] | None = None
    ) -> AsyncIterator[ExecChunk]: ...

    async def run(
        self, argv: Sequence[str], env: Mapping[str, str] | None = None
    ) -> tuple[int, bytes, bytes]:
        """To completion, output whole: what the supervisor's own commands use."""

    async def endpoint(self, port: int, published: bool = False) -> tuple[str, int] | None:
        """Where the node reaches ``port`` of the environment, if it can.

        ``published``: the port published on the node's loopback (what users get
        forwarded); otherwise the most direct way in, for health checks (Docker's
        proxy accepts connections even when nothing listens behind it).
        """


async def run(
    env: Env, argv: Sequence[str], environment: Mapping[str, str] | None = None
) -> tuple[int, bytes, bytes]:
    """Run argv to completion: (exit code, stdout, stderr)."""
    return await env.run(argv, environment)


def service_dir(name: str) -> str:
    return f"{SVC_ROOT}/{name}"


async def start(
    env: Env, name: str, argv: Sequence[str], environment: Mapping[str, str], detached: bool
) -> tuple[int, asyncio.Task[int]]:
    """Start the service; (pid, task that ends with its exit code).

    ``detached``: the wrapper is left running in the background and its exit is
    polled, for providers whose exec streams should not stay open.
    """
    d = service_dir(name)
    # Clear the last run's pid first: reading it back must never find a stale one.
    await run(env, ["rm", "-f", f"{d}/pid", f"{d}/exit"])
    if detached:
        launcher = 'setsid sh -c "$0" "$@" </dev/null >/dev/null 2>&1 &'
        await run(env, ["sh", "-c", launcher, _WRAPPER, "vendetta-svc", d, *argv], environment)
        for _ in range(100):
            pid = await read_pid(env, name)
            if pid:
                return pid, asyncio.create_task(watch_exit(env, name, pid))
            await asyncio.sleep(0.05)
        code = await exit_code(env, name)
        return 0, asyncio.create_task(_done(code if code is not None else -1))
    stream = env.exec(["sh", "-c", _WRAPPER, "vendetta-svc", d, *argv], environment)

    async def wait_exit() -> int:
        code = -1
        async for chunk in stream:
            if chunk.exit_code is not None:
                code = chunk.exit_code
        return code

    task = asyncio.create_task(wait_exit())
    for _ in range(100):  # the wrapper writes the pid at once
        pid = await read_pid(env, name)
        if pid or task.done():
            return pid, task
        await asyncio.sleep(0.05)
    return 0, task


async def _done(code: int) -> int:
    return code


async def read_pid(env: Env, name: str) -> int:
    code, out, _ = await run(env, ["cat", f"{service_dir(name)}/pid"])
    try:
        return int(out.strip()) if code == 0 else 0
    except ValueError:
        return 0


async def alive(env: Env, pid: int) -> bool:
    code, _, _ = await run(env, ["kill", "-0", str(pid)])
    return code == 0


async def exit_code(env: Env, name: str) -> int | None:
    code, out, _ = await run(env, ["cat", f"{service_dir(name)}/exit"])
    try:
        return int(out.strip()) if code == 0 else None
    except ValueError:
        return None


async def watch_exit(env: Env, name: str, pid: int, interval: float = 1.0) -> int:
    """After an agent restart there is no wrapper stream: poll until the service ends.

    An exec can fail for reasons of its own (seen with LXD's websockets), so a
    process is taken for gone only after several checks in a row say so.
    """
    misses = 0
    while True:
        try:
            code = await exit_code(env, name)
            if code is not None:
                return code
            misses = 0 if await alive(env, pid) else misses + 1
        except VendettaError:
            misses += 1
        if misses >= 3:
            return -1
        await asyncio.sleep(interval)


async def find_running(env: Env, name: str, tries: int = 3) -> int:
    """The pid of the service if it still runs, else 0.

    As in watch_exit, a process is taken for gone only when several reads in a
    row agree: one failed exec (seen with LXD) must not start a second copy.
    """
    for attempt in range(tries):
        try:
            pid = await read_pid(env, name)
            if pid and await exit_code(env, name) is None and await alive(env, pid):
                return pid
        except VendettaError:
            pass
        if attempt + 1 < tries:
            await asyncio.sleep(0.2)
    return 0


async def signal(env: Env, pid: int, sig: str) -> None:
    await run(env, ["kill", f"-{sig}", str(pid)])


async def tail(
    env: Env, name: str, stream: str, offset: int, feed: Callable[[str, bytes], Awaitable[None]]
) -> None:
    """Follow the service's output file from byte ``offset`` until cancelled."""
    d = service_dir(name)
    # Stop a tail left by an earlier agent run, so only one feeds the log.
    await run(env, ["sh", "-c", f'kill "$(cat {d}/tail-{stream}.pid)" 2>/dev/null; true'])
    while True:
        async for chunk in env.exec(
            ["sh", "-c", _TAIL, "vendetta-tail", d, stream, str(offset + 1)]
        ):
            if chunk.stdout:
                offset += len(chunk.stdout)
                await feed(stream, chunk.stdout)
        await asyncio.sleep(0.5)  # tail exited (file rotated?): follow again


async def read_from(env: Env, path: str, offset: int, most: int) -> bytes:
    """At most ``most`` bytes of ``path`` after its first ``offset`` (none if it is missing)."""
    code, out, _ = await run(
        env, ["sh", "-c", READ_FROM, "vendetta-read", path, str(offset + 1), str(most)]
    )
    return out if code == 0 else b""


async def poll_tail(
    env: Env,
    name: str,
    stream: str,
    offset: int,
    feed: Callable[[str, bytes], Awaitable[None]],
    interval: float = 0.5,
) -> None:
    """Read what the service wrote since ``offset``, every ``interval``, until cancelled.

    At most ``POLL_MAX`` bytes per read, so a backlog (a chatty service, an agent
    that was down for a while) is taken in pieces, one right after the other.
    """
    path = f"{service_dir(name)}/{stream}"
    while True:
        out = b""
        with contextlib.suppress(VendettaError):
            out = await read_from(env, path, offset, POLL_MAX)
            if out:
                offset += len(out)
                await feed(stream, out)
        if len(out) < POLL_MAX:
            await asyncio.sleep(interval)


async def stop_tails(env: Env, name: str) -> None:
    d = service_dir(name)
    await run(
        env,
        [
            "sh",
            "-c",
            f'for s in stdout stderr; do kill "$(cat {d}/tail-$s.pid)" 2>/dev/null; done; true',
        ],
    )
