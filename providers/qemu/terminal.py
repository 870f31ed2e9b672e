"""Interactive terminals in QEMU guests, on the guest's virtio console.

The guest agent can neither stream nor give a PTY, so a terminal's wire is a
virtio console of the domain (domain.py): in the guest it is ``/dev/hvc0``, a
real tty (termios, window size, job control); on the node it is a pty of
QEMU's, opened through libvirt (channel.py), one client at a time.

A session (:func:`open_session`, blocking):

1. open that console;
2. start the command with ``guest-exec``, through :data:`GUEST_SCRIPT`: it
   hangs up whatever an earlier terminal left on the console, then runs the
   command in a new session with the console as its controlling terminal,
   sized with ``stty``, after printing a per-session token;
3. read until the token: everything before it is stale, and once it shows
   the command's terminal is open, so nothing typed from then on is lost.

Then the output is what the socket delivers, the input what is written to it.
A resize is a ``guest-exec`` of ``stty rows R cols C`` on the console (the
kernel sends SIGWINCH to the foreground process group). The exit code comes
from polling ``guest-exec-status`` of the started process; once it has
exited, what is still on its way is read for a moment before the last chunk.

QEMU's virtio console drops guest output that the node side does not take
in time (it never blocks the guest): the reader thread takes it at once
into a buffer of up to :data:`MAX_BUFFERED` chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import TypeVar

import libvirt

from common.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    UnavailableError,
)
from providers.base import ExecChunk, Terminal
from providers.qemu import agent
from providers.qemu.channel import open_channel
from providers.threaded import EngineClient

T = TypeVar("T")

# The guest's device of the terminal console: the only virtio console, so hvc0.
GUEST_DEVICE = "/dev/hvc0"
DEFAULT_TERM = "xterm"
# Until the command's terminal is ready; a TCG guest under load is slow.
READY_SECONDS = 30.0
# Polling guest-exec-status for the exit code: from FIRST_POLL up to MAX_POLL apart.
FIRST_POLL = 0.05
MAX_POLL = 0.5
# After the exit: read until the output is quiet this long, at most DRAIN_SECONDS.
QUIET_SECONDS = 0.2
DRAIN_SECONDS = 2.0
READ_SIZE = 65536
MAX_BUFFERED = 64

# Run by guest-exec as ``sh -c GUEST_SCRIPT vendetta-terminal DEVICE MODE ARGS...``:
#   start TOKEN ROWS COLS ARGV...  the session (exec'd: guest-exec's pid is its leader)
#   resize ROWS COLS               the console's window size
#   hangup                         SIGHUP to every process the console controls
# argv travels as positional parameters: never parsed by a shell.
GUEST_SCRIPT = r"""
dev=$1 mode=$2
shift 2
hangup() {
    x=$(stat -L -c '%t %T' "$dev" 2>/dev/null) || return 0
    set -- $x
    tty=$((0x$1 * 256 + 0x$2))
    pids=
    for f in /proc/[0-9]*/stat; do
        read -r line <"$f" 2>/dev/null || continue
        set -- ${line##*) }
        if [ "$5" = "$tty" ]; then p=${f#/proc/}; pids="$pids ${p%/stat}"; fi
    done
    if [ -n "$pids" ]; then kill -HUP $pids 2>/dev/null; kill -CONT $pids 2>/dev/null; fi
    return 0
}
case $mode in
start)
    [ -c "$dev" ] || { echo "this guest has no terminal console $dev" >&2; exit 126; }
    hangup
    exec setsid -c /bin/sh -c 'stty sane rows "$2" cols "$3" &&
        printf "\033]vendetta;%s\007" "$1" && shift 3 && exec "$@"' sh "$@" <"$dev" >"$dev" 2>&1 ;;
resize) exec stty -F "$dev" rows "$1" cols "$2" ;;
hangup) hangup ;;
*) echo "unknown mode $mode" >&2; exit 2 ;;
esac
"""


def guest_argv(mode: str, *args: str) -> list[str]:
    return ["/bin/sh", "-c", GUEST_SCRIPT, "vendetta-terminal", GUEST_DEVICE, mode, *args]


def ready_token(nonce: str) -> bytes:
    """What the session prints once its terminal is ready (an OSC sequence, invisible)."""
    return f"\033]vendetta;{nonce}\007".encode()


def _connect(dom: libvirt.virDomain, alias: str, workspace: str) -> socket.socket:
    """The terminal console, through libvirt (channel.py)."""
    return open_channel(dom.connect().getURI(), dom.name(), workspace, console=alias)


def _drain(sock: socket.socket, token: bytes, seen: bytearray, quiet: float = 0.5) -> bytes:
    """What arrives on ``sock`` until it is quiet for ``quiet`` seconds or ``token`` shows."""
    more = bytearray()
    sock.settimeout(quiet)
    with contextlib.suppress(TimeoutError, OSError):
        while token not in seen + more:
            data = sock.recv(READ_SIZE)
            if not data:
                break
            more += data
    return bytes(more)


def _await_ready(
    sock: socket.socket, dom: libvirt.virDomain, pid: int, token: bytes, workspace: str
) -> bytes:
    """Read until ``token``; what follows it. Raises if the session ends first."""
    seen = bytearray()
    deadline = time.monotonic() + READY_SECONDS
    next_poll = time.monotonic() + FIRST_POLL
    sock.settimeout(FIRST_POLL)
    while token not in seen:
        with contextlib.suppress(TimeoutError):
            data = sock.recv(READ_SIZE)
            if not data:
                raise UnavailableError(
                    f"the terminal console of workspace {workspace!r} closed: the guest stopped"
                )
            seen += data
            continue
        now = time.monotonic()
        if now >= next_poll:
            exited, code, _, err = agent.exec_status(dom, pid)
            if exited:
                # A command that ends at once may end before its console output
                # (the token first) has come through QEMU: read what is on its way.
                seen += _drain(sock, token, seen)
                if token in seen:
                    break
                said = (err + bytes(seen)).decode("utf-8", "replace").strip()
                raise FailedPreconditionError(
                    f"the terminal in workspace {workspace!r} ended as it started (exit code "
                    f"{code}): {said or 'no output'}"
                )
            next_poll = now + MAX_POLL
        if now > deadline:
            raise DeadlineExceededError(
                f"the terminal in workspace {workspace!r} was not ready within {READY_SECONDS:.0f}s"
            )
    sock.settimeout(None)
    return bytes(seen[seen.index(token) + len(token) :])


def open_session(
    dom: libvirt.virDomain,
    alias: str,
    workspace: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    rows: int,
    cols: int,
) -> tuple[socket.socket, int, bytes]:
    """Blocking: (connected socket, pid of the session, its first output)."""
    sock = _connect(dom, alias, workspace)
    pid = -1
    try:
        nonce = os.urandom(8).hex()
        start = guest_argv("start", nonce, str(rows), str(cols), *argv)
        # Captured: the script's own complaints; the session itself writes to the console.
        pid = agent.exec_start(dom, start, env, capture=True)
        first = _await_ready(sock, dom, pid, ready_token(nonce), workspace)
    except BaseException:
        if pid > 0:
            hang_up(dom)
        sock.close()
        raise
    return sock, pid, first


def resize_console(dom: libvirt.virDomain, rows: int, cols: int) -> None:
    """Blocking: set the console's window size; returns once ``stty`` has done it."""
    pid = agent.exec_start(dom, guest_argv("resize", str(rows), str(cols)), {}, capture=False)
    delay = FIRST_POLL
    deadline = time.monotonic() + READY_SECONDS
    while not agent.exec_status(dom, pid)[0] and time.monotonic() < deadline:
        time.sleep(delay)
        delay = min(delay * 2, MAX_POLL)


def hang_up(dom: libvirt.virDomain) -> None:
    """Blocking, best effort: SIGHUP to the console's session, as a hang-up would."""
    with contextlib.suppress(libvirt.libvirtError):
        agent.exec_start(dom, guest_argv("hangup"), {}, capture=False)


class QemuTerminal(Terminal):
    def __init__(
        self,
        dom: libvirt.virDomain,
        sock: socket.socket,
        pid: int,
        first: bytes,
        *,
        client: EngineClient[libvirt.virConnect],
        workspace: str,
        release: Callable[[], None],
    ) -> None:
        self._dom = dom
        self._sock = sock
        self._pid = pid
        self._client = client
        self._workspace = workspace
        self._release = release
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._room = threading.Semaphore(MAX_BUFFERED)
        self._stopping = threading.Event()
        self._code: int | None = None  # the command's exit code, once it has exited
        self._closed = False
        self._size: tuple[int, int] | None = None
        self._resizer: asyncio.Task[None] | None = None
        if first:
            self._room.acquire()
            self._queue.put_nowait(first)
        self._thread = threading.Thread(
            target=self._read, name=f"vendetta-qemu-tty-{workspace}", daemon=True
        )
        self._thread.start()

    # -- reader thread ---------------------------------------------------------

    def _put(self, item: bytes | None) -> bool:
        if item is not None:
            while not self._room.acquire(timeout=0.25):
                if self._stopping.is_set():
                    return False
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed
            return False
        return True

    def _read(self) -> None:
        try:
            while not self._stopping.is_set():
                data = self._sock.recv(READ_SIZE)
                if not data or not self._put(data):
                    break
        except OSError:
            pass
        finally:
            self._put(None)

    # -- event loop side -------------------------------------------------------

    async def _call(self, action: str, fn: Callable[[], T]) -> T:
        return await self._client.call(
            f"{action} in workspace {self._workspace!r}", lambda _conn: fn()
        )

    async def _next(self, timeout: float) -> bytes | bool | None:
        """The next chunk, None at the end of the socket, False after ``timeout``."""
        try:
            item = await asyncio.wait_for(self._queue.get(), max(timeout, 0.0))
        except TimeoutError:
            return False
        if item is not None:
            self._room.release()
        return item

    async def _exited(self) -> tuple[bool, int, bytes]:
        exited, code, _, err = await self._call(
            "waiting for the terminal", lambda: agent.exec_status(self._dom, self._pid)
        )
        return exited, code, err

    async def output(self) -> AsyncIterator[ExecChunk]:
        try:
            async for chunk in self._output():
                yield chunk
        finally:
            if self._code is not None:
                await self._disconnect()

    async def _output(self) -> AsyncIterator[ExecChunk]:
        loop = asyncio.get_running_loop()
        delay = FIRST_POLL
        next_poll = loop.time() + delay
        while True:
            item = await self._next(next_poll - loop.time())
            if item is None:  # QEMU closed the console: the guest is gone
                raise UnavailableError(
                    f"workspace {self._workspace!r} stopped while its terminal was open"
                )
            if item:
                yield ExecChunk(stdout=bytes(item))
            if loop.time() < next_poll:
                continue
            exited, code, err = await self._exited()
            if exited:
                break
            delay = min(delay * 2, MAX_POLL)
            next_poll = loop.time() + delay
        # What the command wrote last may still be on its way from the guest.
        deadline = loop.time() + DRAIN_SECONDS
        while isinstance(
            item := await self._next(min(QUIET_SECONDS, deadline - loop.time())), bytes
        ):
            yield ExecChunk(stdout=item)
        if err:
            yield ExecChunk(stderr=err)
        self._code = code
        yield ExecChunk(exit_code=code)

    async def write(self, data: bytes) -> None:
        with contextlib.suppress(OSError):  # closed: the output says why
            await asyncio.to_thread(self._sock.sendall, data)

    async def resize(self, rows: int, cols: int) -> None:
        """Applied in the order asked, the latest size last; never waits for the guest."""
        self._size = (rows, cols)
        if self._resizer is None or self._resizer.done():
            self._resizer = asyncio.create_task(self._apply_sizes())

    async def _apply_sizes(self) -> None:
        applied = None
        while not self._closed and self._size is not None and self._size != applied:
            rows, cols = size = self._size
            with contextlib.suppress(Exception):  # the session may be ending
                await self._call(
                    "resizing the terminal",
                    functools.partial(resize_console, self._dom, rows, cols),
                )
            applied = size

    async def _disconnect(self) -> None:
        """Close our end of the console (QEMU then takes the next client) and free the slot."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._release()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._resizer is not None:
            self._resizer.cancel()
        try:
            if self._code is None and not self._stopping.is_set():
                # Still running, nobody attached any more: hang it up, then collect its
                # status so the guest agent forgets it.
                await asyncio.to_thread(hang_up, self._dom)
                with contextlib.suppress(Exception):
                    for _ in range(10):
                        if (await self._exited())[0]:
                            break
                        await asyncio.sleep(0.1)
        finally:
            await self._disconnect()


__all__ = ["QemuTerminal", "hang_up", "open_session"]
