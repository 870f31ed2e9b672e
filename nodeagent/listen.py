"""Listen: a listener inside an environment whose connections reach the client
(`ssh -R`: a TCP port on the environment's loopback; `ssh -A`: a unix socket
in a folder only the session's user may enter, for SSH_AUTH_SOCK).

As with Dial (nodeagent/dial.py), nothing is entered but through the engine's
exec: a small python3 program inside listens, numbers each connection it
accepts and multiplexes them over its stdin/stdout in frames of
(kind, connection, length, bytes). It ends, and its listener with it, when
its stdin does: when the SSH session or connection that asked for it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator

from common.errors import FailedPreconditionError, InvalidArgumentError, UnavailableError
from nodeagent.providers import ProviderSet
from providers.base import ExecChunk, Terminal
from vendetta.v1 import common_pb2

FRAME = struct.Struct(">BII")
LISTENING, ACCEPTED, DATA, EOF, CLOSED = b"LADEC"

# Inside: argv is [python3, -c, PROGRAM, HOST, PORT, PATH].
PROGRAM = r"""
import os, socket, struct, sys, threading
F = struct.Struct(">BII")
lock = threading.Lock()
def send(kind, conn, data=b""):
    with lock:
        buf = memoryview(F.pack(kind, conn, len(data)) + data)
        while buf:
            buf = buf[os.write(1, buf):]
host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
try:
    if path:
        folder = os.path.dirname(path)
        os.makedirs(folder, mode=0o700, exist_ok=True)
        os.chmod(folder, 0o700)
        if os.path.exists(path): os.unlink(path)
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(path)
        os.chmod(path, 0o600)
    else:
        srv = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((host, port))
    srv.listen(64)
except OSError as e:
    sys.stderr.write(e.strerror or str(e)); sys.exit(1)
send(76, 0, str(0 if path else srv.getsockname()[1]).encode())
conns = {}
def pump(n, s):
    try:
        while True:
            d = s.recv(262144)
            if not d: break
            send(68, n, d)
    except OSError: pass
    send(69, n)
def accept():
    n = 0
    while True:
        try: s, addr = srv.accept()
        except OSError: return
        n += 1
        conns[n] = s
        peer = "" if path else "%s %d" % (addr[0], addr[1])
        send(65, n, peer.encode())
        threading.Thread(target=pump, args=(n, s), daemon=True).start()
threading.Thread(target=accept, daemon=True).start()
inp = os.fdopen(0, "rb", buffering=0)
def read(n):
    buf = b""
    while len(buf) < n:
        d = inp.read(n - len(buf))
        if not d: return None
        buf += d
    return buf
try:
    while True:
        h = read(F.size)
        if h is None: break
        kind, n, size = F.unpack(h)
        data = read(size) if size else b""
        if data is None: break
        s = conns.get(n)
        if s is None: continue
        try:
            if kind == 68: s.sendall(data)
            elif kind == 69: s.shutdown(socket.SHUT_WR)
            elif kind == 67: conns.pop(n, None); s.close()
        except OSError: pass
finally:
    if path:
        try: os.unlink(path)
        except OSError: pass
"""


class Frames:
    """Frames out of a byte stream that cuts them anywhere."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        self._buf += data
        out: list[tuple[int, int, bytes]] = []
        while len(self._buf) >= FRAME.size:
            kind, conn, size = FRAME.unpack_from(self._buf)
            end = FRAME.size + size
            if len(self._buf) < end:
                break
            out.append((kind, conn, bytes(self._buf[FRAME.size : end])))
            del self._buf[:end]
        return out


def _output(kind: int, conn: int, data: bytes) -> common_pb2.ListenOutput | None:
    if kind == ACCEPTED:
        host, _, port = data.decode(errors="replace").partition(" ")
        opened = common_pb2.ListenAccepted(conn=conn, orig_host=host, orig_port=int(port or 0))
        return common_pb2.ListenOutput(accepted=opened)
    if kind == DATA:
        return common_pb2.ListenOutput(data=common_pb2.ListenData(conn=conn, data=data))
    if kind == EOF:
        return common_pb2.ListenOutput(eof=conn)
    return None


async def listen(
    providers: ProviderSet, requests: AsyncIterator[common_pb2.ListenInput]
) -> AsyncIterator[common_pb2.ListenOutput]:
    first = await anext(aiter(requests), None)
    if first is None or first.WhichOneof("input") != "start":
        raise InvalidArgumentError("a listen stream starts with a `start` message")
    start = first.start
    if start.path and not start.path.startswith("/"):
        raise InvalidArgumentError(f"a socket path inside must be absolute, not {start.path!r}")
    if not start.path and not 0 <= start.port < 65536:
        raise InvalidArgumentError(f"cannot listen on port {start.port}")
    provider = providers.get(start.provider)
    if not provider.capabilities.stdin:
        raise FailedPreconditionError(
            f"listeners inside {provider.name} environments are not available yet"
        )
    where = start.path or f"{start.host or '127.0.0.1'}:{start.port}"
    argv = ["/bin/sh", "-c", 'exec python3 -c "$@"', "vendetta-listen", PROGRAM]
    argv += [start.host or "127.0.0.1", str(start.port), start.path]
    relay = await provider.pipe(start.workspace, argv, {})
    try:
        frames = Frames()
        output = aiter(relay.output())
        port = await _listening(output, frames, where)
        yield common_pb2.ListenOutput(listening=port)
        inputs = asyncio.create_task(_pump(requests, relay))
        try:
            async for chunk in output:
                for kind, conn, data in frames.feed(chunk.stdout):
                    msg = _output(kind, conn, data)
                    if msg is not None:
                        yield msg
        finally:
            inputs.cancel()
            await asyncio.gather(inputs, return_exceptions=True)
    finally:
        with contextlib.suppress(Exception):
            await relay.close()


async def _listening(output: AsyncIterator[ExecChunk], frames: Frames, where: str) -> int:
    stderr = b""
    async for chunk in output:
        stderr += chunk.stderr
        for kind, _, data in frames.feed(chunk.stdout):
            if kind == LISTENING:
                return int(data or b"0")
        code = chunk.exit_code
        if code is not None:
            text = stderr.decode(errors="replace").strip()
            if code == 127 or "not found" in text:
                raise FailedPreconditionError(
                    f"cannot listen on {where} inside: the image has no python3, which "
                    "remote and agent forwarding run inside"
                )
            raise UnavailableError(f"cannot listen on {where} inside: {text or 'failed'}")
    raise UnavailableError(f"cannot listen on {where} inside: the listener ended")


async def _pump(requests: AsyncIterator[common_pb2.ListenInput], relay: Terminal) -> None:
    async for msg in requests:
        kind = msg.WhichOneof("input")
        if kind == "data":
            frame = FRAME.pack(DATA, msg.data.conn, len(msg.data.data)) + msg.data.data
        elif kind == "eof":
            frame = FRAME.pack(EOF, msg.eof, 0)
        elif kind == "close":
            frame = FRAME.pack(CLOSED, msg.close, 0)
        else:
            continue
        await relay.write(frame)
    await relay.close_stdin()
