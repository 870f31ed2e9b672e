"""The handshake of a raw dial connection (nodeagent/dial_socket.py): one JSON
line each way, then the connection's bytes. The client sends the target, the
agent answers once the connection inside is open, or why it is not:

    -> {"workspace": "api", "provider": "docker", "host": "127.0.0.1", "port": 8080}
    <- {"connected": true}              or  {"error": "cannot connect to ..."}

The client sends nothing more until the answer; the bytes after the answer's
newline are the service's (a server that speaks first).
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

# A line longer than this is not a handshake.
LINE_MAX = 8192


class HandshakeError(Exception):
    """The other side closed, or sent something that is not a handshake line."""


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


async def read_line(sock: socket.socket) -> tuple[dict[str, Any], bytes]:
    """The first line of a non-blocking socket, decoded, and what came after it."""
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
