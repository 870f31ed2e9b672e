"""Taking a port of the node's loopback, as another program would."""

from __future__ import annotations

import socket


def try_bind(port: int) -> socket.socket | None:
    """A socket listening on 127.0.0.1:``port``, or None while something holds it
    (LXD's forkproxy goes on listening for a moment after a stop returns)."""
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        squatter.bind(("127.0.0.1", port))
    except OSError:
        squatter.close()
        return None
    squatter.listen()
    return squatter
