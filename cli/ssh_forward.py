"""`ssh -L` and `ssh -D` through `NAME.vendetta`: each direct-tcpip channel the
client opens becomes one connection through the agent's dial socket when the
coordinator runs on this machine (DialRoute), else one Dial stream through the
coordinator; either way the workspace's agent connects from inside.

The channel is confirmed only once the connection inside is open, so a port
nothing listens on fails that channel with the reason ("connect failed:
cannot connect to 127.0.0.1:9 inside workspace 'api': connection refused
inside the workspace"), as sshd does, and the session goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncssh
import grpc
from asyncssh import SSHTCPSession
from asyncssh.stream import SSHTCPStreamSession

from cli import tunnel_master
from cli.agent_route import Link, Routed, open_route
from common.forwarder import Forwarder, join
from common.rpc_errors import from_rpc_error
from vendetta.v1 import common_pb2

# Bytes read from the channel at once; what waits for the stream to take it.
CHUNK = 256 * 1024
BACKLOG = 8
# Seconds for a connection from this machine to a redirected target.
DIRECT_TIMEOUT = 3.0


def _refused(reason: str) -> asyncssh.ChannelOpenError:
    return asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, reason)


class _ChannelSide(Forwarder, SSHTCPSession[bytes]):
    """The SSH channel's side of a routed connection (common/forwarder.py)."""


async def _routed(link: Link, start: common_pb2.DialStart) -> SSHTCPSession[bytes] | None:
    """The connection through the agent's dial socket (cli/agent_route.py): the
    channel's bytes then go to OpenSSH's forward and on, in this process's
    callbacks alone. None where there is no route: the caller uses Dial."""
    routed = await open_route(link, start, redirect=True)
    if routed is None:
        return None
    if "redirect" in routed.answer:
        routed.sock.close()
        channel = await _redirected(routed, routed.answer["redirect"])
        if channel is not None:
            return channel
        routed = await open_route(link, start)  # the agent connects after all
        if routed is None:
            return None
    if not routed.answer.get("connected"):
        routed.sock.close()
        raise _refused(routed.error or f"cannot connect to {start.host}:{start.port}")
    channel, service = join(_ChannelSide(), Forwarder())
    service.hold(routed.rest)  # the service's first bytes, if it speaks first
    try:
        await asyncio.get_running_loop().create_unix_connection(lambda: service, sock=routed.sock)
    except BaseException:
        routed.sock.close()
        raise
    return channel


async def _redirected(routed: Routed, target: Any) -> SSHTCPSession[bytes] | None:
    """A published port reached without the agent: through the tunnel's OpenSSH
    master from the node, or from here when the agent runs here."""
    try:
        host, port = str(target[0]), int(target[1])
    except (TypeError, ValueError, IndexError):
        return None
    loop = asyncio.get_running_loop()
    channel, service = join(_ChannelSide(), Forwarder())
    if routed.local:
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: service, host, port), DIRECT_TIMEOUT
            )
        except (OSError, TimeoutError):
            return None
        return channel
    if not await tunnel_master.connect(routed.control, host, port, service):
        return None
    return channel


async def open_direct(link: Link, workspace: str, host: str, port: int) -> SSHTCPSession[bytes]:
    """Connect inside, then hand the channel a session that relays both ways."""
    start = common_pb2.DialStart(workspace=workspace, host=host, port=port)
    routed = await _routed(link, start)
    if routed is not None:
        return routed
    inputs: asyncio.Queue[common_pb2.DialInput | None] = asyncio.Queue(maxsize=BACKLOG)

    async def requests() -> AsyncIterator[common_pb2.DialInput]:
        yield common_pb2.DialInput(start=start)
        while (msg := await inputs.get()) is not None:
            yield msg

    try:
        call = (await link.stub()).Dial(requests())
    except Exception as exc:  # no coordinator: this channel fails, the session goes on
        raise _refused(str(exc)) from exc
    responses = aiter(call)
    try:
        first = await anext(responses)
    except grpc.aio.AioRpcError as exc:
        raise _refused(str(from_rpc_error(exc))) from exc
    except StopAsyncIteration as exc:
        raise _refused(f"the connection to {host}:{port} inside ended at once") from exc
    if first.WhichOneof("output") != "connected":
        call.cancel()
        raise _refused(f"the connection to {host}:{port} inside did not open")

    async def relay(reader: asyncssh.SSHReader[bytes], writer: asyncssh.SSHWriter[bytes]) -> None:
        async def upstream() -> None:
            while data := await reader.read(CHUNK):
                await inputs.put(common_pb2.DialInput(data=data))
            await inputs.put(common_pb2.DialInput(eof=True))

        up = asyncio.create_task(upstream())
        try:
            async for out in responses:
                kind = out.WhichOneof("output")
                if kind == "data":
                    writer.write(out.data)
                    await writer.drain()
                elif kind == "eof":
                    writer.write_eof()
        except (grpc.aio.AioRpcError, asyncssh.Error, OSError):
            pass  # the connection inside failed, or the client went: close the channel
        finally:
            up.cancel()
            await asyncio.gather(up, return_exceptions=True)
            call.cancel()
            with contextlib.suppress(Exception):
                writer.close()

    return SSHTCPStreamSession[bytes](relay)
