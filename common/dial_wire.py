"""The handshake of a raw dial connection (nodeagent/dial_socket.py): one JSON
line each way, then the connection's bytes. The client sends the target, the
agent answers once the connection inside is open, or why it is not:

    -> {"workspace": "api", "provider": "docker", "host": "127.0.0.1", "port": 8080}
    <- {"connected": true}              or  {"error": "cannot connect to ..."}

The client sends nothing more until the answer; the bytes after the answer's
newline are the service's (a server that speaks first). A client that can
reach the node's side itself adds `"redirect": true`; for a target the agent
would connect to from the node (a published port), it then answers
`{"redirect": [HOST, PORT]}` and closes.

A command instead of a target (a session of ssh-proxy without a terminal: scp,
sftp-server, rsync, git) names its argv and environment:

    -> {"workspace": "api", "provider": "docker", "argv": [...], "env": {...}}
    <- {"connected": true}              or  {"error": "..."}

then the client's bytes are the command's stdin (a half-close is its end of
file), and the agent's are frames: a kind byte (`o` stdout, `e` stderr, `x` the
exit code, ASCII), the payload's length (4 bytes, big-endian), the payload.

A command on a terminal (an interactive session) adds `"tty": true, "rows": R,
"cols": C`, and the agent's answer says `"tty": true` back (an agent that
predates terminals here would run it on pipes: the client then closes and uses
Connect). The client's bytes are then frames as well: `i` input, `r` the
terminal's new size ("ROWS COLS", ASCII); a half-close is still the end of file.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import Iterator
from typing import Any

# A line longer than this is not a handshake.
LINE_MAX = 8192
# Seconds either side waits for the other's line: the agent's answer comes once the
# connection inside is open or refused (the relay gives up connecting after 15 s).
# A node that falls silent ends the tunnel sooner (ServerAlive, 30 s); a client
# that connects and says nothing is let go.
HANDSHAKE_TIMEOUT = 60.0


class HandshakeError(Exception):
    """The other side closed, or sent something that is not a handshake line."""


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


async def read_line(sock: socket.socket) -> tuple[dict[str, Any], bytes]:
    """The first line of a non-blocking socket, decoded, and what came after it;
    HandshakeError if it does not come within HANDSHAKE_TIMEOUT."""
    try:
        return await asyncio.wait_for(_read_line(sock), HANDSHAKE_TIMEOUT)
    except TimeoutError:
        raise HandshakeError(f"no handshake line within {HANDSHAKE_TIMEOUT:.0f} s") from None


async def _read_line(sock: socket.socket) -> tuple[dict[str, Any], bytes]:
    loop = asyncio.get_running_loop()
    buf = b""
    while b"\n" not in buf:
        if len(buf) > LINE_MAX:
            raise HandshakeError("the handshake line is too long")
        chunk = await loop.sock_recv(sock, 65536)
        if not chunk:
            raise HandshakeError("the connection closed during the handshake")
        buf += chunk
    line, _, rest = buf.partition(b"\n")
    try:
        message = json.loads(line)
    except ValueError as exc:
        raise HandshakeError(f"not a handshake line: {line[:80]!r}") from exc
    if not isinstance(message, dict):
        raise HandshakeError(f"not a handshake line: {line[:80]!r}")
    return message, rest


STDOUT, STDERR, EXIT = b"o", b"e", b"x"
STDIN, RESIZE = b"i", b"r"  # from the client, on a terminal only
_HEADER = struct.Struct(">cI")


def frame(kind: bytes, payload: bytes) -> bytes:
    return _HEADER.pack(kind, len(payload)) + payload


class Frames:
    """Frames out of the bytes of a stream, however they were cut."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> Iterator[tuple[bytes, bytes]]:
        self._buf += data
        while len(self._buf) >= _HEADER.size:
            kind, size = _HEADER.unpack_from(self._buf)
            end = _HEADER.size + size
            if len(self._buf) < end:
                return
            payload = bytes(self._buf[_HEADER.size : end])
            del self._buf[:end]
            yield kind, payload

    @property
    def pending(self) -> int:
        return len(self._buf)
