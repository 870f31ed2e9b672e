"""A small blocking WebSocket client (RFC 6455) for LXD's exec websockets.

pylxd opens exec websockets with ws4py, whose shared poller is what makes
its long exec streams unreliable (see ``Capabilities.long_exec_streams``).
An interactive terminal needs two websockets that stay open as long as the
session: this client gives each one a plain socket, read by exactly one
thread and written by any thread under a lock, closed by shutting the socket
down (which also wakes a thread blocked reading it). No extension, no
compression: LXD (gorilla/websocket) negotiates none unless asked.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import socket
import struct
import threading
from urllib.parse import unquote, urlparse

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

MAX_HEADER = 64 * 1024


class HandshakeError(Exception):
    """The server did not switch protocols (its status line says why)."""


def _mask(key: bytes, data: bytes) -> bytes:
    n = len(data)
    if not n:
        return b""
    repeated = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(repeated, "big")).to_bytes(n, "big")


def _open_socket(url: str, timeout: float) -> tuple[socket.socket, str]:
    """A connected socket for ``url`` (ws+unix:// or ws://) and the Host header to send."""
    parsed = urlparse(url)
    if parsed.scheme == "ws+unix":
        path = unquote(parsed.netloc + parsed.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
        except BaseException:
            sock.close()
            raise
        return sock, "localhost"
    if parsed.scheme == "ws":
        host = parsed.hostname or "localhost"
        port = parsed.port or 80
        return socket.create_connection((host, port), timeout=timeout), parsed.netloc
    raise HandshakeError(
        f"websockets over {parsed.scheme or url!r} are not supported here: use LXD's "
        "local unix socket (or a plain http endpoint)"
    )


class WebSocket:
    """One client websocket. ``recv`` from one thread; ``send_*`` and ``close`` from any."""

    def __init__(self, sock: socket.socket, buffered: bytes = b"") -> None:
        self._sock = sock
        self._buf = bytearray(buffered)
        self._send_lock = threading.Lock()
        self._closed = False
        self.close_code: int | None = None

    @classmethod
    def connect(cls, url: str, resource: str, timeout: float = 10.0) -> WebSocket:
        """Open ``resource`` (path and query) on the server at ``url``; blocking."""
        sock, host = _open_socket(url, timeout)
        try:
            key = base64.b64encode(os.urandom(16))
            request = (
                f"GET {resource} HTTP/1.1\r\n"
                f"Host: {host}\r\n"
                "Upgrade: websocket\r\n"
                "Connection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key.decode()}\r\n"
                "Sec-WebSocket-Version: 13\r\n"
                "\r\n"
            )
            sock.sendall(request.encode())
            head = bytearray()
            while b"\r\n\r\n" not in head:
                if len(head) > MAX_HEADER:
                    raise HandshakeError("the server's handshake answer is too long")
                data = sock.recv(4096)
                if not data:
                    raise HandshakeError("the server closed the connection during the handshake")
                head += data
            header, _, rest = bytes(head).partition(b"\r\n\r\n")
            lines = header.decode("latin-1").split("\r\n")
            status = lines[0]
            if status.split(" ")[1:2] != ["101"]:
                raise HandshakeError(f"the server answered {status!r}")
            fields = {
                name.strip().lower(): value.strip()
                for name, _, value in (line.partition(":") for line in lines[1:])
            }
            accept = base64.b64encode(hashlib.sha1(key + _GUID).digest()).decode()
            if fields.get("sec-websocket-accept") != accept:
                raise HandshakeError("the server's Sec-WebSocket-Accept does not match")
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        return cls(sock, rest)

    # -- reading (one thread) ------------------------------------------------------

    def _read(self, n: int) -> bytes | None:
        while len(self._buf) < n:
            try:
                data = self._sock.recv(max(65536, n - len(self._buf)))
            except OSError:
                return None  # shut down by close(), or reset
            if not data:
                return None
            self._buf += data
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _frame(self) -> tuple[bool, int, bytes] | None:
        head = self._read(2)
        if head is None:
            return None
        fin, opcode = bool(head[0] & 0x80), head[0] & 0x0F
        masked, length = bool(head[1] & 0x80), head[1] & 0x7F
        if length == 126:
            raw = self._read(2)
            if raw is None:
                return None
            (length,) = struct.unpack("!H", raw)
        elif length == 127:
            raw = self._read(8)
            if raw is None:
                return None
            (length,) = struct.unpack("!Q", raw)
        key = self._read(4) if masked else b""
        payload = self._read(length) if length else b""
        if key is None or payload is None:
            return None
        return fin, opcode, _mask(key, payload) if masked else payload

    def recv(self) -> bytes | None:
        """The next data message (binary or text), or None once the connection is closed.

        Answers pings, and a close from the server with a close of its own.
        """
        message = bytearray()
        kind: int | None = None
        while True:
            frame = self._frame()
            if frame is None:
                return None
            fin, opcode, payload = frame
            if opcode == OP_CLOSE:
                if len(payload) >= 2:
                    (self.close_code,) = struct.unpack("!H", payload[:2])
                self._send_close()
                return None
            if opcode == OP_PING:
                self._send(OP_PONG, payload)
                continue
            if opcode == OP_PONG:
                continue
            if opcode in (OP_TEXT, OP_BINARY):
                kind = opcode
                message = bytearray(payload)
            elif opcode == OP_CONTINUATION and kind is not None:
                message += payload
            else:
                continue  # an opcode this client does not know: skip it
            if fin:
                return bytes(message)

    # -- writing (any thread) ------------------------------------------------------

    def _send(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 1 << 16:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        key = os.urandom(4)
        with self._send_lock:
            self._sock.sendall(head + key + _mask(key, payload))

    def send_binary(self, data: bytes) -> None:
        self._send(OP_BINARY, data)

    def send_text(self, text: str) -> None:
        self._send(OP_TEXT, text.encode())

    def _send_close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):  # the server is gone already
            self._send(OP_CLOSE, struct.pack("!H", 1000))

    def close(self) -> None:
        """Say goodbye (best effort), then shut the socket down; idempotent."""
        self._send_close()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
