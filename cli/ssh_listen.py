"""`ssh -R` and `ssh -A` through `NAME.vendetta`: a listener inside the
workspace (one Listen stream through the coordinator to the agent,
nodeagent/listen.py), each connection it accepts opened back to the client as
a channel: forwarded-tcpip for `-R`, the client's ssh-agent for `-A`.

The listener lives as long as what asked for it: `-R` until the client
cancels it or the connection ends; the agent's socket until its session ends.
As sshd with its default GatewayPorts=no, `-R` listens on loopback inside.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncssh
import grpc

from cli.agent_route import Link
from cli.ssh_forward import CHUNK
from common.rpc_errors import from_rpc_error
from vendetta.v1 import common_pb2

# Opens the channel back to the client for a connection accepted inside (its peer).
Streams = tuple[asyncssh.SSHReader[bytes], asyncssh.SSHWriter[bytes]]
Opener = Callable[[str, int], Awaitable[Streams]]


def say(text: str) -> None:
    """A line on the user's terminal: a ProxyCommand's stderr is the ssh client's."""
    with contextlib.suppress(OSError):
        sys.stderr.write(f"vendetta: {text}\n")
        sys.stderr.flush()


class Inside(asyncssh.SSHListener):
    """A listener inside the workspace, as asyncssh's port forwarding sees one."""

    def __init__(self, port: int, task: asyncio.Task[None]) -> None:
        super().__init__()
        self._port = port
        self._task = task

    def get_port(self) -> int:
        return self._port

    def close(self) -> None:
        self._task.cancel()

    async def wait_closed(self) -> None:
        await asyncio.gather(self._task, return_exceptions=True)


async def listen(
    link: Link, workspace: str, opener: Opener, *, port: int = 0, path: str = ""
) -> Inside:
    """Listen inside (TCP on loopback, or a unix socket at ``path``); raises
    ``asyncssh.Error``-free ``RuntimeError`` with the reason when it cannot."""
    inputs: asyncio.Queue[common_pb2.ListenInput | None] = asyncio.Queue()
    start = common_pb2.ListenStart(workspace=workspace, host="127.0.0.1", port=port, path=path)

    async def requests() -> AsyncIterator[common_pb2.ListenInput]:
        yield common_pb2.ListenInput(start=start)
        while (msg := await inputs.get()) is not None:
            yield msg

    call = (await link.stub()).Listen(requests())
    responses = aiter(call)
    try:
        first = await anext(responses)
    except grpc.aio.AioRpcError as exc:
        raise RuntimeError(str(from_rpc_error(exc))) from exc
    except StopAsyncIteration as exc:
        raise RuntimeError("the listener inside ended at once") from exc
    if first.WhichOneof("output") != "listening":
        call.cancel()
        raise RuntimeError("the listener inside did not start")
    task = asyncio.create_task(_serve(call, responses, inputs, opener))
    return Inside(first.listening, task)


async def _serve(
    call: grpc.aio.StreamStreamCall[common_pb2.ListenInput, common_pb2.ListenOutput],
    responses: AsyncIterator[common_pb2.ListenOutput],
    inputs: asyncio.Queue[common_pb2.ListenInput | None],
    opener: Opener,
) -> None:
    # Per connection: what came from inside, None at its end-of-file.
    queues: dict[int, asyncio.Queue[bytes | None]] = {}
    tasks: set[asyncio.Task[None]] = set()
    try:
        async for out in responses:
            kind = out.WhichOneof("output")
            if kind == "accepted":
                n = out.accepted.conn
                queue: asyncio.Queue[bytes | None] = asyncio.Queue()
                queues[n] = queue
                peer = (out.accepted.orig_host, out.accepted.orig_port)
                task = asyncio.create_task(_connection(n, peer, queue, inputs, opener))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            elif kind == "data" and (q := queues.get(out.data.conn)) is not None:
                q.put_nowait(out.data.data)
            elif kind == "eof" and (q := queues.pop(out.eof, None)) is not None:
                q.put_nowait(None)
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.CANCELLED:
            say(f"a listener inside ended: {from_rpc_error(exc)}")
    finally:
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        call.cancel()


async def _connection(
    n: int,
    peer: tuple[str, int],
    queue: asyncio.Queue[bytes | None],
    inputs: asyncio.Queue[common_pb2.ListenInput | None],
    opener: Opener,
) -> None:
    """One connection accepted inside, relayed to a channel back to the client."""
    try:
        reader, writer = await opener(*peer)
    except (asyncssh.Error, OSError) as exc:
        say(f"a connection accepted inside could not reach your side: {exc}")
        inputs.put_nowait(common_pb2.ListenInput(close=n))
        return

    async def upstream() -> None:
        while data := await reader.read(CHUNK):
            inputs.put_nowait(common_pb2.ListenInput(data=common_pb2.ListenData(conn=n, data=data)))
        inputs.put_nowait(common_pb2.ListenInput(eof=n))

    up = asyncio.create_task(upstream())
    try:
        while (data := await queue.get()) is not None:
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await up
    except (asyncssh.Error, OSError):
        pass
    finally:
        up.cancel()
        await asyncio.gather(up, return_exceptions=True)
        inputs.put_nowait(common_pb2.ListenInput(close=n))
        with contextlib.suppress(Exception):
            writer.close()
