"""LXD's exec websockets on the websocket-client library, over LXD's unix socket.

pylxd opens exec websockets with ws4py, whose shared poller is what makes
its long exec streams unreliable (see ``Capabilities.long_exec_streams``).
An interactive terminal needs two websockets that stay open as long as the
session, so each one here is a blocking ``websocket.WebSocket`` on a socket of
its own that we connect (websocket-client speaks ws:// and wss:// only, not
``ws+unix://``). This module is the seam: it gives the terminal ``bytes``,
``None`` and ``OSError`` instead of the library's types and exceptions, and a
``close`` that is safe while another thread is blocked reading.

``recv`` from exactly one thread; ``send_*`` and ``close`` from any (the
library locks its sends).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from urllib.parse import unquote, urlparse

import websocket

# Every thread reading one of our websockets has a name starting with this.
THREAD_PREFIX = "vendetta-lxd-"

# websocket-client answers a server's close with its own and pings with pongs, in recv.
_DATA = (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY)


class HandshakeError(Exception):
    """The server did not switch protocols (its status line says why)."""


def _open_socket(url: str, timeout: float) -> tuple[socket.socket, str]:
    """A connected socket for ``url`` (ws+unix:// or ws://) and the ws:// address to ask."""
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
        return sock, "ws://localhost"
    if parsed.scheme == "ws":
        host = parsed.hostname or "localhost"
        port = parsed.port or 80
        return socket.create_connection((host, port), timeout=timeout), f"ws://{parsed.netloc}"
    raise HandshakeError(
        f"websockets over {parsed.scheme or url!r} are not supported here: use LXD's "
        "local unix socket (or a plain http endpoint)"
    )


class WebSocket:
    """One client websocket. ``recv`` from one thread; ``send_*`` and ``close`` from any."""

    def __init__(self, ws: websocket.WebSocket, sock: socket.socket) -> None:
        self._ws = ws
        self._sock = sock  # ours: the library forgets it once it sees the end

    @classmethod
    def connect(cls, url: str, resource: str, timeout: float = 10.0) -> WebSocket:
        """Open ``resource`` (path and query) on the server at ``url``; blocking."""
        sock, base = _open_socket(url, timeout)
        try:
            # No Origin: LXD does not ask for one, and our old client sent none.
            ws = websocket.create_connection(
                base + resource, timeout=timeout, socket=sock, suppress_origin=True
            )
            ws.settimeout(None)  # a terminal waits for output as long as it takes
        except websocket.WebSocketException as exc:
            sock.close()
            raise HandshakeError(str(exc).split(" -+-+- ", 1)[0]) from exc
        except BaseException:
            sock.close()
            raise
        return cls(ws, sock)

    def recv(self) -> bytes | None:
        """The next data message (binary or text), or None once the connection is closed."""
        try:
            opcode, data = self._ws.recv_data()
        except (websocket.WebSocketException, OSError):
            return None  # shut down by close(), reset, or not a websocket any more
        if opcode not in _DATA:
            return None  # the server's close (already answered)
        payload: bytes | str = data
        return payload.encode() if isinstance(payload, str) else payload

    def messages(self) -> Iterator[bytes]:
        """Data messages until the connection closes, or an empty one (LXD's end of output)."""
        while data := self.recv():
            yield data

    def _send(self, payload: bytes | str, opcode: int) -> None:
        try:
            self._ws.send(payload, opcode)
        except websocket.WebSocketException as exc:  # closed already: as a socket would say
            raise ConnectionError(str(exc)) from exc

    def send_binary(self, data: bytes) -> None:
        self._send(data, websocket.ABNF.OPCODE_BINARY)

    def send_text(self, text: str) -> None:
        self._send(text, websocket.ABNF.OPCODE_TEXT)

    def close(self) -> None:
        """Say goodbye (best effort), then shut the socket down; idempotent.

        Not ``websocket.WebSocket.close``: that one reads the server's answer itself,
        beside the reader thread. Shutting the socket down wakes that thread instead.
        """
        if self._ws.connected:  # False once a close went out or the connection was lost
            with contextlib.suppress(websocket.WebSocketException, OSError):
                self._ws.send_close()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
