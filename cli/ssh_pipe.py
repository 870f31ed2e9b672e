"""A session of `ssh NAME.vendetta` without a terminal (scp, the image's
sftp-server, rsync, git) through the agent's dial socket (cli/agent_route.py)
instead of a Connect stream: the same command, input and output, with no gRPC
message per chunk in this process or the agent and none of it in the
coordinator. 400 MB by scp into a workspace on the bench's node: 72 -> 103
MB/s; CPU of the proxy 2.7 -> 2.0 s, the agent 1.3 -> 0.7 s, the coordinator
1.4 s -> none (docs/performance.md)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from cli.agent_route import Link, open_route
from common.dial_wire import EXIT, STDERR, STDOUT, Frames
from common.errors import UnavailableError
from vendetta.v1 import common_pb2

# Bytes read from the agent at once.
CHUNK = 256 * 1024


async def run(
    link: Link,
    start: common_pb2.AttachStart,
    inputs: asyncio.Queue[common_pb2.AttachInput | None],
    stdout: Callable[[bytes], object],
    stderr: Callable[[bytes], object],
    drain: Callable[[], Awaitable[None]] | None = None,
) -> int | None:
    """As terminal.stream (``start`` without a terminal, then ``inputs`` until None or
    their end of file): the command's exit code. None where there is no route to
    the agent: the caller runs it through Connect, ``inputs`` untouched. ``drain``
    waits while the client is behind on the output: no more is read from the agent
    meanwhile, and the command waits (a large download does not pile up here)."""
    routed = await open_route(
        link,
        common_pb2.DialStart(workspace=start.workspace),
        argv=list(start.argv),
        env=dict(start.env),
    )
    if routed is None:
        return None
    if not routed.answer.get("connected"):
        routed.sock.close()
        raise UnavailableError(routed.error or "the command did not start")
    reader, writer = await asyncio.open_unix_connection(sock=routed.sock, limit=CHUNK)

    async def send() -> None:
        while (msg := await inputs.get()) is not None:
            kind = msg.WhichOneof("input")
            if kind == "stdin":
                writer.write(msg.stdin)
                await writer.drain()
            elif kind == "stdin_eof":
                break
        writer.write_eof()

    sending = asyncio.create_task(send())
    frames = Frames()
    code: int | None = None
    try:
        data = routed.rest
        while True:
            for kind, payload in frames.feed(data):
                if kind == STDOUT:
                    stdout(payload)
                elif kind == STDERR:
                    stderr(payload)
                elif kind == EXIT:
                    code = int(payload)
            if drain is not None and data:
                await drain()
            if code is not None or not (data := await reader.read(CHUNK)):
                break
    finally:
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await sending
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    if code is None:
        raise UnavailableError("the connection to the workspace's agent ended (node reconnecting?)")
    return code
