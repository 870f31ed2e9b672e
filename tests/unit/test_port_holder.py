"""Naming the process that holds a port, from /proc."""

from __future__ import annotations

import os
import socket

from common.loopback import is_free
from coordinator.port_holder import who_holds


def test_names_the_listening_process_and_sees_the_port_free_after() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert not is_free(port)
        assert who_holds(port).startswith(f"pid {os.getpid()} (")
    assert is_free(port)
    assert "cannot see" in who_holds(port)  # nobody listens: says it cannot tell
