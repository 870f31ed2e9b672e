"""A guest's virtio-serial port, reached through libvirt, as a local socket.

QEMU's sockets for the ports belong to its own user (libvirt-qemu, mode 0775):
an agent run as a user in the libvirt group cannot connect to them. libvirt
can, for any client allowed to manage the domain: ``virDomainOpenChannel``
(a virtio-serial port) and ``virDomainOpenConsole`` (the terminal console)
tie a libvirt stream to one. Streams only flow with libvirt's event
loop running, and a blocking one would hold its connection's lock while it
waits, so each channel gets a connection of its own, a non-blocking stream,
and a pump (_Pump) between it and one end of a socket pair. The caller uses
the other end like any socket; either side closing closes both.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading

import libvirt

from common.errors import FailedPreconditionError, UnavailableError

READ_SIZE = 1 << 18  # libvirt's largest stream message
# What the event thread may queue for our socket before it stops reading the stream.
QUEUE_LIMIT = 4 << 20
_SOCKET_BUFFER = 4 << 20
_loop_lock = threading.Lock()
_loop_started = False


def _ensure_event_loop() -> None:
    """libvirt's own event loop, in a thread of its own, for the life of the process.
    Registered before any connection the streams use is opened."""
    global _loop_started
    with _loop_lock:
        if _loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _loop_started = True


class _Pump:
    """Moves bytes between a non-blocking libvirt stream and our end of a socket pair.

    libvirt's event thread is shared by every stream of the process, so it never
    blocks here: what it receives goes to a queue a thread of ours writes into the
    socket, and while that queue is full the stream's READABLE events are off.
    Our other thread sends from the socket into the stream; where libvirt's buffer
    is full it waits for WRITABLE, and tries again every half second in any case
    (a wake-up lost between two event updates costs that, not a hang).
    """

    def __init__(self, conn: libvirt.virConnect, stream: libvirt.virStream, ours: socket.socket):
        self._conn, self._stream, self._sock = conn, stream, ours
        self._writable = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()  # the event mask and the queue's size
        self._reading, self._want_write = True, False
        self._queue: queue.Queue[bytes | None] = queue.Queue()
        self._queued = 0
        stream.eventAddCallback(self._mask(), self._on_event, None)
        for target in (self._to_stream, self._to_socket):
            threading.Thread(target=target, name="libvirt-channel", daemon=True).start()

    def _mask(self) -> int:
        events: int = libvirt.VIR_STREAM_EVENT_HANGUP | libvirt.VIR_STREAM_EVENT_ERROR
        if self._reading:
            events |= libvirt.VIR_STREAM_EVENT_READABLE
        if self._want_write:
            events |= libvirt.VIR_STREAM_EVENT_WRITABLE
        return events

    def _update(self, *, reading: bool | None = None, want_write: bool | None = None) -> None:
        with self._lock:
            if reading is not None:
                self._reading = reading
            if want_write is not None:
                self._want_write = want_write
            if not self._closed.is_set():
                with contextlib.suppress(libvirt.libvirtError):
                    self._stream.eventUpdateCallback(self._mask())

    def _on_event(self, stream: libvirt.virStream, events: int, _opaque: object) -> None:
        if events & libvirt.VIR_STREAM_EVENT_WRITABLE:
            self._writable.set()
            self._update(want_write=False)
        if events & libvirt.VIR_STREAM_EVENT_READABLE:
            try:
                while self._queued < QUEUE_LIMIT and (data := stream.recv(READ_SIZE)) != -2:
                    if not data:  # the guest's end (QEMU) closed
                        self._queue.put(None)
                        return
                    with self._lock:
                        self._queued += len(data)
                    self._queue.put(data)
            except libvirt.libvirtError:
                self._queue.put(None)
                return
            if self._queued >= QUEUE_LIMIT:  # our socket is slow: stop taking more
                self._update(reading=False)
        if events & (libvirt.VIR_STREAM_EVENT_HANGUP | libvirt.VIR_STREAM_EVENT_ERROR):
            self._queue.put(None)

    def _to_socket(self) -> None:
        try:
            while (data := self._queue.get()) is not None:
                self._sock.sendall(data)
                with self._lock:
                    self._queued -= len(data)
                    resume = not self._reading and self._queued < QUEUE_LIMIT // 2
                if resume:
                    self._update(reading=True)
        except OSError:
            pass
        finally:
            self.close()

    def _to_stream(self) -> None:
        try:
            while data := self._sock.recv(READ_SIZE):
                view = memoryview(data)
                while view and not self._closed.is_set():
                    sent = self._stream.send(view.tobytes())
                    if sent == -2:  # libvirt's buffer is full: wait until it drains
                        self._writable.clear()
                        self._update(want_write=True)
                        self._writable.wait(0.5)
                        continue
                    view = view[sent:]
        except (libvirt.libvirtError, OSError):
            pass
        finally:
            self.close()

    def close(self) -> None:
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
        self._queue.put(None)
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(libvirt.libvirtError):
            self._stream.eventRemoveCallback()
        with contextlib.suppress(libvirt.libvirtError):
            self._stream.abort()
        with contextlib.suppress(libvirt.libvirtError):
            self._conn.close()
        self._sock.close()


def open_channel(
    uri: str, domain: str, workspace: str, *, channel: str = "", console: str = ""
) -> socket.socket:
    """Blocking: a socket whose bytes are those of the running ``domain``'s ``channel``
    (a virtio-serial port's name) or ``console`` (a console's alias)."""
    _ensure_event_loop()
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise UnavailableError(f"cannot reach libvirt at {uri}: {exc.get_error_message()}") from exc
    try:
        dom = conn.lookupByName(domain)
        stream = conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
        # FORCE: a stream an earlier agent left open is ours to take over.
        if console:
            dom.openConsole(console, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
        else:
            dom.openChannel(channel, stream, libvirt.VIR_DOMAIN_CHANNEL_FORCE)
    except libvirt.libvirtError as exc:
        conn.close()
        what = "terminal console" if console else "stream port"
        raise FailedPreconditionError(
            f"cannot open the {what} of workspace {workspace!r}: {exc.get_error_message()}"
        ) from exc
    try:
        ours, theirs = socket.socketpair()
    except OSError:
        conn.close()
        raise
    try:
        for sock in (ours, theirs):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
        _Pump(conn, stream, ours)
    except (OSError, libvirt.libvirtError):
        for sock in (ours, theirs):
            sock.close()
        with contextlib.suppress(libvirt.libvirtError):
            stream.abort()
        conn.close()
        raise
    return theirs
