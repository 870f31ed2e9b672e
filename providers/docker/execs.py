"""Commands run in containers (``docker exec``): made, streamed, and their exit code.

An exec's output is read from its raw socket in a reader thread
(``providers.threaded.ThreadedStream``); closing the stream shuts the socket
down, which ends the thread. Docker has no API to kill an exec'd process, so a
command whose stream was closed early may run on inside the container.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping, Sequence
from typing import Any

from providers.base import ExecChunk
from providers.docker.streams import STDERR, exec_frames, shutdown_socket
from providers.threaded import Closer, EngineClient, Opener, ThreadedStream


def create_exec(
    api: Any,
    container_id: str,
    argv: Sequence[str],
    env: Mapping[str, str] | None,
    *,
    workdir: str = "",
    stdin: bool = False,
    tty: bool = False,
) -> str:
    """Make (not start) an exec of argv, no shell; its id. Blocking."""
    created = api.exec_create(
        container_id,
        list(argv),
        stdin=stdin,
        stdout=True,
        stderr=True,
        tty=tty,
        environment=dict(env) if env else None,
        workdir=workdir or None,
    )
    return str(created["Id"])


async def exit_code(engine: EngineClient[Any], exec_id: str, action: str) -> int:
    """The exec's exit code, once Docker has it: its output ends just before."""
    delay = 0.005
    while True:
        result: dict[str, Any] = await engine.call(action, lambda api: api.exec_inspect(exec_id))
        if not result.get("Running"):
            break
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.5)
    code = result.get("ExitCode")
    return int(code) if code is not None else -1


def open_frames(api: Any, exec_id: str) -> tuple[Iterable[tuple[int, bytes]], Closer]:
    """Start the exec (no stdin, no TTY): its output frames and how to close them. Blocking."""
    sock = api.exec_start(exec_id, socket=True)
    return exec_frames(sock), lambda: shutdown_socket(sock)


async def chunks(
    engine: EngineClient[Any],
    exec_id: str,
    open_stream: Opener[tuple[int, bytes]],
    *,
    thread_name: str,
    action: str,
    on_error: Callable[[Exception], Exception],
) -> AsyncGenerator[ExecChunk, None]:
    """The (stream id, bytes) frames ``open_stream`` gives, read in a thread named
    ``thread_name``, as chunks; then one with the exec's exit code.

    Close it (``contextlib.aclosing``): that closes the stream and ends the thread."""
    frames: ThreadedStream[tuple[int, bytes]] = ThreadedStream(thread_name, open_stream, on_error)
    try:
        async for stream_id, data in frames:
            yield ExecChunk(stderr=data) if stream_id == STDERR else ExecChunk(stdout=data)
    finally:
        await frames.aclose()
    yield ExecChunk(exit_code=await exit_code(engine, exec_id, action))
