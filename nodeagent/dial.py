"""Dial: a TCP connection to a host and port as seen from inside an environment.

What `ssh -L`/`-D` through `NAME.vendetta` reach. Dev servers mostly listen on
127.0.0.1 inside, which the node cannot reach through the environment's
address (and a QEMU guest has none), and entering the environment's network
namespace needs privileges a non-root agent lacks. So the connection is made
by a small relay run inside through the engine's exec with stdin (the same
pipe sessions use): the first of python3, bash (/dev/tcp) or nc the image
has. It writes one NUL byte once connected, then relays; a failure to connect
is its stderr and exit code. nc gives no such signal: with it, a refused
connection shows as a channel that closes at once.

A port the workspace publishes, asked for at the environment's loopback, is
first tried straight from the agent, at the environment's own address or the
port's published endpoint: its bytes then skip the engine (direct_target).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

from common.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    UnavailableError,
    VendettaError,
)
from nodeagent.providers import ProviderSet
from providers.base import ExecChunk, Provider, Terminal
from vendetta.v1 import common_pb2

CONNECTED = b"\0"

# python3: half-closes both ways and says why a connect failed. Ends when the
# far side closes (the SSH channel then closes, as with sshd).
_PYTHON = r"""
import os, socket, sys, threading
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=15)
except OSError as e:
    sys.stderr.write(e.strerror or str(e)); sys.exit(1)
s.settimeout(None)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
os.write(1, b"\0")
def up():
    try:
        while True:
            d = os.read(0, 262144)
            if not d: break
            s.sendall(d)
    except OSError: pass
    try: s.shutdown(socket.SHUT_WR)
    except OSError: pass
threading.Thread(target=up, daemon=True).start()
out = os.fdopen(1, "wb", buffering=0)
try:
    while True:
        d = s.recv(262144)
        if not d: break
        out.write(d)
except OSError: pass
"""

# The relay: argv is [sh, -c, RELAY, vendetta-dial, HOST, PORT]. bash: our stdin to
# the socket in the background (its own copy: a background job's stdin is /dev/null),
# the socket to our stdout until the far side closes.
# nc: busybox's writes 8 KiB at a time, each a frame through the engine and the
# agent; dd passes on whatever has gathered in the pipe (no wait for a full block),
# which took `ssh -L` through it from 20-37 to 51-78 MB/s.
RELAY = f"""
if command -v python3 >/dev/null 2>&1; then exec python3 -c '{_PYTHON}' "$1" "$2"; fi
if command -v bash >/dev/null 2>&1; then
  exec bash -c 'exec 3<>"/dev/tcp/$1/$2" || exit 1; printf "\\0"; exec 4<&0
    cat <&4 >&3 & w=$!; cat <&3; kill $w 2>/dev/null; exit 0' vendetta-dial "$1" "$2"
fi
if command -v nc >/dev/null 2>&1; then
  printf '\\0'
  if command -v dd >/dev/null 2>&1; then nc "$1" "$2" | dd bs=262144 2>/dev/null; exit; fi
  exec nc "$1" "$2"
fi
echo "no python3, bash or nc in the image to connect with" >&2; exit 127
"""


def relay_argv(host: str, port: int) -> list[str]:
    return ["/bin/sh", "-c", RELAY, "vendetta-dial", host, str(port)]


def _reason(stderr: bytes) -> str:
    text = stderr.decode(errors="replace").strip().splitlines()
    # bash: "bash: connect: Connection refused" then "bash: /dev/tcp/...: Connection refused"
    last = text[-1] if text else "the relay inside ended"
    return last.rsplit(": ", 1)[-1] if ": " in last else last


def check_start(start: common_pb2.DialStart) -> None:
    if not start.host or not 0 < start.port < 65536:
        raise InvalidArgumentError(f"cannot connect to {start.host!r} port {start.port}")


@dataclass
class Relay:
    """The relay inside, connected: its output after the NUL, and what came with it."""

    pipe: Terminal
    output: AsyncIterator[ExecChunk]
    first: bytes

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.pipe.close()


async def open_relay(provider: Provider, start: common_pb2.DialStart) -> Relay:
    """The relay run inside, once it has connected; the reason it could not, if not."""
    if not provider.capabilities.stdin:
        raise FailedPreconditionError(
            f"connections into {provider.name} environments are not available yet (its "
            "engine runs commands without input); publish the port in the workspace's config"
        )
    where = f"{start.host}:{start.port} inside workspace {start.workspace!r}"
    pipe = await provider.pipe(start.workspace, relay_argv(start.host, start.port), {})
    try:
        output = aiter(pipe.output())
        return Relay(pipe, output, await _connected(output, where))
    except BaseException:
        with contextlib.suppress(Exception):
            await pipe.close()
        raise


async def dial(
    providers: ProviderSet, requests: AsyncIterator[common_pb2.DialInput]
) -> AsyncIterator[common_pb2.DialOutput]:
    first = await anext(aiter(requests), None)
    if first is None or first.WhichOneof("input") != "start":
        raise InvalidArgumentError("a dial stream starts with a `start` message")
    start = first.start
    check_start(start)
    provider = providers.get(start.provider)
    target = await direct_target(provider, start.workspace, start.host, start.port)
    direct = None
    if target is not None:
        with contextlib.suppress(OSError, TimeoutError):
            direct = await asyncio.wait_for(
                asyncio.open_connection(*target, limit=MESSAGE), DIRECT_TIMEOUT
            )
    if direct is not None:
        nodelay(direct[1].get_extra_info("socket"))
        async for out in _relay_socket(requests, *direct):
            yield out
        return
    relay = await open_relay(provider, start)
    try:
        yield common_pb2.DialOutput(connected=True)
        inputs = asyncio.create_task(_pump(requests, relay.pipe))
        try:
            if relay.first:
                yield common_pb2.DialOutput(data=relay.first)
            async for data in coalesced(relay.output):
                yield common_pb2.DialOutput(data=data)
            yield common_pb2.DialOutput(eof=True)
        finally:
            inputs.cancel()
            await asyncio.gather(inputs, return_exceptions=True)
    finally:
        await relay.close()


# Names of the environment's own loopback, which a service listening on all of
# its addresses also answers on the environment's address.
LOOPBACK = frozenset({"127.0.0.1", "localhost"})
# A refused connect comes back at once on a bridge; this bounds a firewall that drops.
DIRECT_TIMEOUT = 3.0


async def direct_target(
    provider: Provider, workspace: str, host: str, port: int
) -> tuple[str, int] | None:
    """Where the agent connects itself for a port the workspace publishes (a
    service's `port:`) asked for at the environment's loopback: the environment's
    own address (Docker's bridge, an LXD instance's network) where it has one,
    else the port's published endpoint on the node (an LXD proxy device, QEMU's
    port forward). That port already reaches the user's machine from the node
    (`workspace ports`), and a connection this way skips the engine's exec stream
    and the relay (most of the CPU of `ssh -L`); the service sees the peer it
    sees for `workspace ports` (the node's side of the bridge; LXD's proxy and
    QEMU's forward connect from inside). Any other port goes through the relay,
    from 127.0.0.1 inside, as sshd's `-L` would: a dev server started by hand
    that trusts loopback (a debug console) keeps doing so. A published endpoint
    accepts even when nothing listens behind it: a service that is down then
    shows as a connection that closes at once."""
    if host not in LOOPBACK:
        return None
    try:
        status = await provider.inspect(workspace)
    except VendettaError:
        return None  # the relay's path reports what is wrong
    if port not in status.ports:
        return None
    address = next((a for a in status.addresses if ":" not in a), None)
    if address is not None:
        return address, port
    node_host, _, node_port = status.ports[port].rpartition(":")
    return (node_host, int(node_port)) if node_host and node_port.isdigit() else None


def nodelay(sock: socket.socket | None) -> None:
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _relay_socket(
    requests: AsyncIterator[common_pb2.DialInput],
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> AsyncIterator[common_pb2.DialOutput]:
    async def pump() -> None:
        async for msg in requests:
            kind = msg.WhichOneof("input")
            if kind == "data":
                writer.write(msg.data)
                await writer.drain()
            elif kind == "eof":
                break
        if writer.can_write_eof():
            writer.write_eof()

    inputs = asyncio.create_task(pump())
    try:
        yield common_pb2.DialOutput(connected=True)
        with contextlib.suppress(OSError):
            while data := await reader.read(MESSAGE):
                yield common_pb2.DialOutput(data=data)
        yield common_pb2.DialOutput(eof=True)
    finally:
        inputs.cancel()
        await asyncio.gather(inputs, return_exceptions=True)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


# Output read ahead of the stream, and joined into messages of at most this much.
READ_AHEAD = 64
MESSAGE = 1024 * 1024


async def coalesced(output: AsyncIterator[ExecChunk]) -> AsyncIterator[bytes]:
    """The relay's stdout, what has arrived joined into one message: engines hand
    over what the relay writes in small frames (busybox nc: 8 KiB), and each gRPC
    message costs more than its bytes."""
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=READ_AHEAD)

    async def read() -> None:
        try:
            async for chunk in output:
                if chunk.stdout:
                    await queue.put(chunk.stdout)
        finally:
            await queue.put(None)

    reader = asyncio.create_task(read())
    try:
        while (data := await queue.get()) is not None:
            parts = [data]
            size = len(data)
            ended = False
            while size < MESSAGE and not queue.empty():
                more = queue.get_nowait()
                if more is None:
                    ended = True
                    break
                parts.append(more)
                size += len(more)
            yield b"".join(parts)
            if ended:
                break
        await reader  # its error, if the output failed
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)


async def _connected(output: AsyncIterator[ExecChunk], where: str) -> bytes:
    """Wait for the relay's NUL; what came after it in the same chunk."""
    stderr = b""
    async for chunk in output:
        stderr += chunk.stderr
        if chunk.stdout:
            if chunk.stdout[:1] != CONNECTED:
                raise UnavailableError(f"cannot connect to {where}: the relay inside misbehaved")
            return chunk.stdout[1:]
        code = chunk.exit_code
        if code is not None:
            if code == 127 and b"no python3" in stderr:
                raise FailedPreconditionError(
                    f"cannot connect to {where}: the image has no python3, bash or nc to "
                    "connect with"
                )
            raise UnavailableError(
                f"cannot connect to {where}: {_reason(stderr).lower()} inside the workspace"
            )
    raise UnavailableError(f"cannot connect to {where}: the relay inside ended")


async def _pump(requests: AsyncIterator[common_pb2.DialInput], relay: Terminal) -> None:
    async for msg in requests:
        kind = msg.WhichOneof("input")
        if kind == "data":
            await relay.write(msg.data)
        elif kind == "eof":
            await relay.close_stdin()
            return
    await relay.close_stdin()
