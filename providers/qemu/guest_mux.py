"""The guest's end of a QEMU guest's stream multiplexer: runs INSIDE the guest.

The guest agent can neither stream nor take input, so commands with stdin
(``pipe``: sftp-server, scp, rsync, git, the relays of ``ssh -L/-D/-R/-A``)
run through this program instead. The provider (``mux.py``) starts it with
``guest-exec`` as ``python3 -c SOURCE TOKEN`` once it has connected to the
domain's virtio-serial port ``org.vendetta.mux``; the program opens the
guest's end of that port and carries any number of commands over it, each a
stream of frames: header ``(stream, kind, length)`` then ``length`` bytes.

Both ends may find bytes of an earlier connection in the port's buffers, so
each side first writes ``MARK + TOKEN`` and reads nothing as frames before
the other side's mark. Flow control is per stream and per direction: a side
sends at most ``WINDOW`` bytes the other has not yet given back as ``CREDIT``,
so one stalled command never holds up the port for the others.

Python 3 standard library only: this file is what runs in the guest.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import BinaryIO

PORT = "/dev/virtio-ports/org.vendetta.mux"
PIDFILE = "/run/vendetta/mux.pid"
HEADER = struct.Struct(">IBI")
MARK_HOST = b"\0vendetta-mux-host "
MARK_GUEST = b"\0vendetta-mux-guest "
WINDOW = 1 << 20
CHUNK = 1 << 16
# host -> guest
OPEN = 1  # JSON {"argv": [...], "env": {...}}
DATA = 2  # stdin bytes
EOF = 3  # stdin ends
KILL = 4  # SIGKILL the command's process group
CREDIT = 5  # both ways: 4-byte count of bytes taken
# guest -> host
OUT = 6
ERR = 7
EXIT = 8  # 4-byte signed exit code (128+N for signal N); the stream's last frame
STARTED = 9  # the command runs (its output may come first): this end is alive


class Port:
    """The guest's end of the port: whole frames out, one writer at a time."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._lock = threading.Lock()

    def send(self, stream: int, kind: int, payload: bytes = b"") -> None:
        data = memoryview(HEADER.pack(stream, kind, len(payload)) + payload)
        with self._lock:
            while data:
                data = data[os.write(self.fd, data) :]


class Stream:
    """One command: stdin fed by a thread from a queue, stdout and stderr read by two."""

    def __init__(self, port: Port, sid: int, spec: dict[str, object]) -> None:
        self.port, self.sid = port, sid
        self.input: queue.Queue[bytes | None] = queue.Queue()
        self.credit = WINDOW
        self.cond = threading.Condition()
        self.done = False  # EXIT sent: nothing more comes from or goes to it
        self.killed = False  # KILL came: output is read to its end and dropped
        argv = [str(a) for a in spec["argv"]]  # type: ignore[attr-defined]
        env = {str(k): str(v) for k, v in spec["env"].items()}  # type: ignore[attr-defined]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,  # its own process group: KILL takes it all
        )
        self.readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, OUT), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, ERR), daemon=True),
        ]
        for t in [*self.readers, threading.Thread(target=self._feed, daemon=True)]:
            t.start()
        threading.Thread(target=self._wait, daemon=True).start()

    def give(self, n: int) -> None:
        with self.cond:
            self.credit += n
            self.cond.notify_all()

    def _read(self, pipe: BinaryIO, kind: int) -> None:
        fd = pipe.fileno()
        while True:
            with self.cond:  # stdout and stderr share the window: take before reading
                while self.credit <= 0 and not self.killed:
                    self.cond.wait()
                want = CHUNK if self.killed else min(CHUNK, self.credit)
                self.credit -= want
            data = os.read(fd, want)
            with self.cond:
                self.credit += want - len(data)
                killed = self.killed
            if not data:
                return
            if not killed:  # after KILL nobody takes it: read on to end-of-file, drop it
                self.port.send(self.sid, kind, data)

    def _feed(self) -> None:
        pipe = self.proc.stdin
        assert pipe is not None
        broken = False
        while (data := self.input.get()) is not None:
            if not broken:
                try:
                    pipe.write(data)
                    pipe.flush()
                except OSError:  # the command stopped reading: drop the rest, as a pipe does
                    broken = True
            self.port.send(self.sid, CREDIT, struct.pack(">I", len(data)))
        with contextlib.suppress(OSError):
            pipe.close()

    def _wait(self) -> None:
        for t in self.readers:
            t.join()
        code = self.proc.wait()
        self.port.send(self.sid, EXIT, struct.pack(">i", 128 - code if code < 0 else code))
        self.done = True
        self.input.put(None)

    def kill(self) -> None:
        """SIGKILL to its process group: the leader may have exited while children it
        started still hold its output open. The group's id is not reused while it lives;
        once EXIT is sent (``done``) the group may be gone, and nothing is sent."""
        with self.cond:
            if self.killed or self.done:
                return
            self.killed = True
            self.cond.notify_all()
        with contextlib.suppress(OSError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def _read_exact(port: BinaryIO, n: int) -> bytes:
    data = port.read(n)  # buffered: all n bytes, or fewer only at the end
    if len(data) < n:
        raise EOFError
    return data


def _skip_to(port: BinaryIO, mark: bytes) -> None:
    """Read until ``mark``: what came before is an earlier connection's."""
    seen = b""
    while not seen.endswith(mark):
        seen = (seen + _read_exact(port, 1))[-len(mark) :]


def _take_port() -> int:
    """Open the port; an earlier instance that still holds it is killed first."""
    try:
        with open(PIDFILE) as f:
            old = int(f.read().strip() or 0)
        # Only if that pid is still one of us: the file may outlive its process.
        with open(f"/proc/{old}/cmdline", "rb") as f:
            ours = PORT.encode() in f.read()
        if ours and old != os.getpid():
            os.kill(old, signal.SIGKILL)
    except (OSError, ValueError):
        pass
    deadline = time.monotonic() + 10
    while True:
        try:
            fd = os.open(PORT, os.O_RDWR)
            break
        except OSError:  # EBUSY while the old instance lets go
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    os.makedirs(os.path.dirname(PIDFILE), exist_ok=True)
    with open(PIDFILE, "w") as f:
        f.write(str(os.getpid()))
    return fd


def main(token: str) -> None:
    try:
        serve(_take_port(), token)
    finally:
        mine = False
        with contextlib.suppress(OSError, ValueError), open(PIDFILE) as f:
            mine = int(f.read().strip() or 0) == os.getpid()
        if mine:
            with contextlib.suppress(OSError):
                os.unlink(PIDFILE)


def serve(fd: int, token: str) -> None:
    """Carry commands over ``fd`` until the node's end closes."""
    port = Port(fd)
    reader = os.fdopen(os.dup(fd), "rb", buffering=4 * CHUNK)
    streams: dict[int, Stream] = {}
    os.write(fd, MARK_GUEST + token.encode() + b"\n")
    try:
        _skip_to(reader, MARK_HOST + token.encode() + b"\n")
        while True:
            sid, kind, length = HEADER.unpack(_read_exact(reader, HEADER.size))
            payload = _read_exact(reader, length)
            if len(streams) > 64:  # forget the ended ones now and then
                streams = {k: s for k, s in streams.items() if not s.done}
            stream = streams.get(sid)
            if kind == OPEN:
                try:
                    streams[sid] = Stream(port, sid, json.loads(payload))
                    port.send(sid, STARTED)
                except OSError as exc:  # no such program, not executable
                    said = f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc)
                    port.send(sid, ERR, f"{said}\n".encode())
                    port.send(sid, EXIT, struct.pack(">i", 127))
            elif stream is None:
                continue  # a stream that ended meanwhile
            elif kind == DATA:
                stream.input.put(payload)
            elif kind == EOF:
                stream.input.put(None)
            elif kind == CREDIT:
                stream.give(struct.unpack(">I", payload)[0])
            elif kind == KILL:
                stream.kill()
                stream.input.put(None)
    except EOFError:  # the node's end closed: nobody is left to read the commands' output
        for stream in streams.values():
            stream.kill()


if __name__ == "__main__":
    main(sys.argv[1])
