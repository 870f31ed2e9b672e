"""A TCP proxy in front of a test server whose traffic can be paused, for tests.

    proxy = PausableProxy.start("127.0.0.32", sshd.host, sshd.port)
    ...connect to proxy.host:proxy.port...
    proxy.pause()    # nothing goes through any more, either way; connections stay open
    proxy.resume()
    proxy.delay = 0.1  # each chunk waits 100 ms before it goes on, either way (latency)
    proxy.drop()     # every open connection reset (RST); new ones are served
    proxy.stop()

While paused nothing is read from either side: the kernels' buffers fill and the
senders' writes stall, as when a network drops the traffic (iptables DROP), but
without touching the machine's firewall. New connections are accepted and hang.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time

CHUNK = 64 * 1024


class PausableProxy:
    def __init__(self, listener: socket.socket, target: tuple[str, int]) -> None:
        self._listener = listener
        self.host, self.port = listener.getsockname()[:2]
        self._target = target
        self._flowing = threading.Event()
        self._flowing.set()
        self._stopped = False
        self.delay = 0.0  # seconds each chunk waits before it is forwarded
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True, name="proxy-accept").start()

    @classmethod
    def start(cls, host: str, target_host: str, target_port: int) -> PausableProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, 0))
        listener.listen(16)
        return cls(listener, (target_host, target_port))

    def pause(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def drop(self) -> None:
        """Reset every open connection (as a network that drops them would, seen from
        both ends); the listener stays, so new connections go through."""
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    # Linger 0: close sends RST, not FIN.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.close()
            self._sockets.clear()

    def stop(self) -> None:
        self._stopped = True
        self._flowing.set()  # let the pumps see the end
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()
            self._sockets.clear()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        self._flowing.wait()  # a connection made while paused hangs, unanswered
        try:
            upstream = socket.create_connection(self._target, timeout=10)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        with self._lock:
            self._sockets += [client, upstream]
        threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
        self._pump(upstream, client)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                self._flowing.wait()
                data = src.recv(CHUNK)
                if not data or self._stopped:
                    break
                if self.delay:
                    time.sleep(self.delay)
                self._flowing.wait()  # what was read while pausing waits too
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
