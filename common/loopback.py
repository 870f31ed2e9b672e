"""Free TCP ports on this host's loopback: checked, or picked by the kernel."""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Collection

LOOPBACK = "127.0.0.1"


def is_free(port: int, host: str = LOOPBACK) -> bool:
    """Whether a listener could bind ``host:port`` now.

    With SO_REUSEADDR, as Go and asyncio listeners do: a connection in TIME_WAIT
    does not make the port taken. Errors other than "in use" are raised.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def free_ports(count: int, avoid: Collection[int] = (), host: str = LOOPBACK) -> list[int]:
    """``count`` distinct ports free on ``host`` right now, none in ``avoid``.

    The sockets are held together while choosing, so the kernel never hands out
    one port twice. Whoever binds them next may still find one taken meanwhile.
    """
    with contextlib.ExitStack() as stack:
        chosen: list[int] = []
        for _ in range(count + len(avoid)):
            if len(chosen) == count:
                break
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind((host, 0))
            port = int(s.getsockname()[1])
            if port not in avoid:
                chosen.append(port)
        if len(chosen) < count:
            raise OSError(f"could not find {count} free ports on {host}")
        return chosen
