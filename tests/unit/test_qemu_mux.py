"""The QEMU stream multiplexer without a guest: the guest's end (guest_mux.py, as the
guest runs it: ``python3 -c SOURCE``) in a process of its own on one end of a
socket pair, standing in for the virtio-serial port; the node's end (mux.py) on
the other."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import pytest

from common.errors import UnavailableError
from providers.qemu import guest_mux as wire
from providers.qemu.domain import Files, mux_socket
from providers.qemu.mux import GUEST_SOURCE, GuestMux, MuxStream, NoPython, Stalled
from tests.support.qemu import domain_root

ENV = {"PATH": os.environ["PATH"], "LC_ALL": "C"}


class Guest:
    """The guest's end in a subprocess, serving its end of a socket pair."""

    def __init__(self, stale_in: bytes = b"", stale_out: int = 0) -> None:
        self.node, guest = socket.socketpair()
        self.proc: subprocess.Popen[bytes] | None = None
        self.guest = guest
        self.stale_out = stale_out
        self.node.sendall(stale_in)  # what an earlier connection left for the guest

    async def start(self, argv: Sequence[str]) -> Callable[[], Awaitable[tuple[int, bytes] | None]]:
        assert argv[:2] == ["/bin/sh", "-c"] and "python3" in argv[2]
        source, token = argv[-2:]
        # As the guest runs it (python3 -c SOURCE TOKEN), on our socket's fd.
        runner = (
            "import os, sys; src = sys.argv[1]; ns = {'__name__': 'guest'}; "
            # What an earlier instance left for the node: output it never took.
            "fd = int(os.environ['MUX_FD']); stale = b'\\xaa' * int(os.environ['STALE']); "
            "[os.write(fd, stale[i:i + 65536]) for i in range(0, len(stale), 65536)]; "
            "exec(compile(src, 'guest_mux', 'exec'), ns); "
            "ns['serve'](int(os.environ['MUX_FD']), sys.argv[2])"
        )
        self.proc = subprocess.Popen(  # noqa: ASYNC220 - starts at once, as guest-exec does
            [sys.executable, "-c", runner, source, token],
            pass_fds=[self.guest.fileno()],
            env={**ENV, "MUX_FD": str(self.guest.fileno()), "STALE": str(self.stale_out)},
            stderr=subprocess.PIPE,
        )
        self.guest.close()
        proc = self.proc

        async def ended() -> tuple[int, bytes] | None:
            if proc.poll() is None:
                return None
            assert proc.stderr is not None
            return proc.returncode, proc.stderr.read()

        return ended

    async def connect(self) -> GuestMux:
        reader, writer = await asyncio.open_unix_connection(sock=self.node)
        return await GuestMux.start_on(reader, writer, "ws", self.start)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
async def guest() -> AsyncIterator[Guest]:
    g = Guest()
    yield g
    g.stop()


async def _collect(stream: MuxStream) -> tuple[bytes, bytes, int | None]:
    out, err, code = bytearray(), bytearray(), None
    async for chunk in stream.output():
        out += chunk.stdout
        err += chunk.stderr
        if chunk.exit_code is not None:
            code = chunk.exit_code
    return bytes(out), bytes(err), code


async def test_stdin_reaches_the_command_and_output_keeps_streams_apart(guest: Guest) -> None:
    mux = await guest.connect()
    stream = await mux.open(["sh", "-c", "cat; echo oops >&2; exit 3"], ENV)
    await stream.write(b"hello\n")
    await stream.close_stdin()
    out, err, code = await asyncio.wait_for(_collect(stream), 20)
    assert (out, err, code) == (b"hello\n", b"oops\n", 3)
    await mux.aclose()


async def test_ten_megabytes_each_way_pass_whole_through_the_windows(guest: Guest) -> None:
    mux = await guest.connect()
    data = os.urandom(10 * 1024 * 1024)
    stream = await mux.open(["cat"], ENV)

    async def feed() -> None:
        await stream.write(data)
        await stream.close_stdin()

    feeder = asyncio.create_task(feed())
    out, err, code = await asyncio.wait_for(_collect(stream), 60)
    await feeder
    assert hashlib.sha256(out).digest() == hashlib.sha256(data).digest()
    assert (err, code) == (b"", 0)
    await mux.aclose()


async def test_a_command_that_reads_nothing_holds_up_no_other(guest: Guest) -> None:
    mux = await guest.connect()
    stalled = await mux.open(["sleep", "30"], ENV)
    # More than the window: the writer waits for credit that never comes...
    writer = asyncio.create_task(stalled.write(b"x" * (3 * wire.WINDOW)))
    await asyncio.sleep(0.5)
    assert not writer.done()
    # ...and another command on the same connection still runs to its end.
    other = await mux.open(["sh", "-c", "cat; echo done"], ENV)
    await other.write(b"ok ")
    await other.close_stdin()
    assert await asyncio.wait_for(_collect(other), 20) == (b"ok done\n", b"", 0)
    writer.cancel()
    await stalled.close()  # killed: its process group gets SIGKILL
    await mux.aclose()


async def test_output_nobody_takes_waits_in_the_guest_not_in_the_node(guest: Guest) -> None:
    mux = await guest.connect()
    stream = await mux.open(["sh", "-c", "head -c 50000000 /dev/zero"], ENV)
    await asyncio.sleep(1.0)  # nobody reads: the guest may send at most one window
    held = stream.buffered()  # what the node holds for it
    assert 0 < held <= wire.WINDOW
    out, _, code = await asyncio.wait_for(_collect(stream), 60)
    assert (len(out), code) == (50_000_000, 0)  # nothing lost while it waited
    await mux.aclose()


async def test_close_kills_the_whole_process_group(guest: Guest, tmp_path: Path) -> None:
    mux = await guest.connect()
    marker = tmp_path / "child.pid"
    stream = await mux.open(["sh", "-c", f"sleep 300 & echo $! > {marker}; wait"], ENV)
    await _written(marker)
    child = int(marker.read_text())
    await stream.close()
    deadline = time.monotonic() + 10
    while _alive(child):
        assert time.monotonic() < deadline, "the command's child outlived close()"
        await asyncio.sleep(0.05)
    await mux.aclose()


async def test_a_missing_program_is_exit_127_with_the_reason(guest: Guest) -> None:
    mux = await guest.connect()
    stream = await mux.open(["/no/such/program"], ENV)
    out, err, code = await asyncio.wait_for(_collect(stream), 20)
    assert code == 127 and b"No such file" in err and out == b""
    await mux.aclose()


async def test_stale_bytes_of_an_earlier_connection_are_skipped() -> None:
    # Both ways; more than the node's read limit (LimitOverrunError) towards the node.
    stale_in = os.urandom(100_000) + wire.HEADER.pack(1, wire.OPEN, 2) + b"{}"
    g = Guest(stale_in=stale_in, stale_out=1_000_000)
    try:
        mux = await g.connect()
        stream = await mux.open(["echo", "fresh"], ENV)
        assert await asyncio.wait_for(_collect(stream), 20) == (b"fresh\n", b"", 0)
        await mux.aclose()
    finally:
        g.stop()


async def test_the_guest_end_closing_fails_open_streams_and_the_next_send(guest: Guest) -> None:
    mux = await guest.connect()
    stream = await mux.open(["sleep", "300"], ENV)
    guest.stop()
    with pytest.raises(UnavailableError, match="ended"):
        await asyncio.wait_for(_collect(stream), 20)
    assert mux.closed is not None
    with pytest.raises(UnavailableError):
        await mux.open(["true"], ENV)


async def test_node_end_closing_kills_what_runs_in_the_guest(guest: Guest, tmp_path: Path) -> None:
    mux = await guest.connect()
    marker = tmp_path / "pid"
    await mux.open(["sh", "-c", f"echo $$ > {marker}; exec sleep 300"], ENV)
    await _written(marker)
    await mux.aclose()  # the node's end goes: the guest's end reads end-of-file
    assert guest.proc is not None
    guest.proc.wait(timeout=10)
    pid = int(marker.read_text())
    deadline = time.monotonic() + 10
    while _alive(pid):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


async def test_a_guest_without_python3_is_told_apart(tmp_path: Path) -> None:
    """The real start command, in a guest whose PATH has no python3: NoPython (the
    provider then runs commands without input), not a failure of the relay."""
    procs: list[subprocess.Popen[bytes]] = []

    async def start(argv: Sequence[str]) -> Callable[[], Awaitable[tuple[int, bytes] | None]]:
        (tmp_path / "sh").symlink_to("/bin/sh")  # a PATH with a shell and nothing else
        proc = subprocess.Popen(argv, env={"PATH": str(tmp_path)}, stderr=subprocess.PIPE)  # noqa: ASYNC220
        procs.append(proc)

        async def ended() -> tuple[int, bytes] | None:
            if proc.poll() is None:
                return None
            return proc.returncode, b""

        return ended

    node, other = socket.socketpair()
    reader, writer = await asyncio.open_unix_connection(sock=node)
    with pytest.raises(NoPython, match="has no python3"):
        await GuestMux.start_on(reader, writer, "ws", start)
    assert procs[0].returncode == 127
    other.close()


def test_the_domain_has_the_port_and_its_socket_goes_with_the_guest() -> None:
    files = Files.for_domain(Path("/var/lib/vendetta/qemu"), "vd-ws-a1")
    assert mux_socket(domain_root(files)) == str(files.mux_socket)
    assert files.mux_socket in files.all()
    assert GUEST_SOURCE.startswith('"""The guest')


async def _written(marker: Path, step: float = 0.05) -> None:
    """Until a command inside has written its pid to ``marker``."""
    deadline = time.monotonic() + 10
    while not marker.exists() or not marker.read_text().strip():
        assert time.monotonic() < deadline, f"nothing written to {marker}"
        await asyncio.sleep(step)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


async def test_a_guest_that_ignores_its_window_is_cut_off() -> None:
    """A guest's end that sends past its window (a broken or hostile guest) ends the
    connection with a clear error: the node's memory is not the guest's to fill."""
    node, fake = socket.socketpair()
    fake.setblocking(False)

    async def start(argv: Sequence[str]) -> Callable[[], Awaitable[tuple[int, bytes] | None]]:
        fake.send(wire.MARK_GUEST + argv[-1].encode() + b"\n")

        async def ended() -> tuple[int, bytes] | None:
            return None

        return ended

    reader, writer = await asyncio.open_unix_connection(sock=node)
    mux = await GuestMux.start_on(reader, writer, "ws", start)
    opening = asyncio.create_task(mux.open(["cat"], ENV))
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(fake, wire.HEADER.pack(1, wire.STARTED, 0))
    stream = await opening
    chunk = wire.HEADER.pack(1, wire.OUT, wire.CHUNK) + b"x" * wire.CHUNK
    for _ in range(wire.WINDOW // wire.CHUNK + 1):  # one chunk more, nothing taken
        await loop.sock_sendall(fake, chunk)
    deadline = loop.time() + 20
    while mux.closed is None:
        assert loop.time() < deadline, "the node took more than a window"
        await asyncio.sleep(0.01)
    with pytest.raises(UnavailableError, match="past its window"):
        await asyncio.wait_for(_collect(stream), 20)
    assert mux.closed is not None
    fake.close()


async def test_a_guest_end_that_stopped_answering_is_stalled(
    guest: Guest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed or stopped inside the guest while the port stays open: an open that gets
    no answer ends the connection (the provider then starts a new one), not a hang."""
    import providers.qemu.mux as mux_module

    monkeypatch.setattr(mux_module, "OPEN_SECONDS", 1.0)
    mux = await guest.connect()
    assert (await _collect(await mux.open(["true"], ENV)))[2] == 0
    assert guest.proc is not None
    guest.proc.send_signal(signal.SIGSTOP)
    try:
        with pytest.raises(Stalled, match="did not answer"):
            await mux.open(["true"], ENV)
        assert mux.closed is not None
    finally:
        guest.proc.send_signal(signal.SIGCONT)


async def test_stdout_and_stderr_together_stay_in_one_window(guest: Guest) -> None:
    """Both share the command's window: a slow reader of a command that writes both
    hard never sees the guest send past it (which would cut the connection off)."""
    mux = await guest.connect()
    both = "head -c 8000000 /dev/zero & head -c 8000000 /dev/zero >&2; wait"
    stream = await mux.open(["sh", "-c", both], ENV)
    out = err = 0
    async for chunk in stream.output():
        out, err = out + len(chunk.stdout), err + len(chunk.stderr)
        await asyncio.sleep(0.001)  # slower than the guest
        if chunk.exit_code is not None:
            assert chunk.exit_code == 0
    assert (out, err) == (8_000_000, 8_000_000) and mux.closed is None
    await mux.aclose()


async def test_close_kills_children_of_a_leader_that_has_exited(
    guest: Guest, tmp_path: Path
) -> None:
    mux = await guest.connect()
    marker = tmp_path / "child.pid"
    stream = await mux.open(["sh", "-c", f"sleep 300 & echo $! > {marker}"], ENV)
    await _written(marker)
    await asyncio.sleep(0.3)  # the leader (sh) is gone; its child holds the output open
    child = int(marker.read_text())
    await stream.close()
    deadline = time.monotonic() + 10
    while _alive(child):
        assert time.monotonic() < deadline, "the leader's child outlived close()"
        await asyncio.sleep(0.05)
    await mux.aclose()


async def test_commands_closed_with_output_unread_leave_no_threads(guest: Guest) -> None:
    mux = await guest.connect()
    assert guest.proc is not None
    tasks = Path(f"/proc/{guest.proc.pid}/task")
    before = len(list(tasks.iterdir()))
    for _ in range(5):
        stream = await mux.open(["head", "-c", "5000000", "/dev/zero"], ENV)
        await asyncio.sleep(0.2)  # its window is full and nobody takes it
        await stream.close()
    deadline = time.monotonic() + 10
    while len(list(tasks.iterdir())) > before:
        assert time.monotonic() < deadline, "threads of closed commands stay in the guest"
        await asyncio.sleep(0.05)
    await mux.aclose()


async def test_input_after_the_command_exited_is_dropped(guest: Guest) -> None:
    mux = await guest.connect()
    stream = await mux.open(["sh", "-c", "head -c 10 >/dev/null"], ENV)
    collected = asyncio.create_task(_collect(stream))
    # More than its window: the command read 10 bytes and exited; the rest goes nowhere.
    await asyncio.wait_for(stream.write(os.urandom(3 * wire.WINDOW)), 20)
    await stream.close_stdin()
    assert (await asyncio.wait_for(collected, 20))[2] == 0
    await mux.aclose()


async def test_a_stall_is_found_with_input_waiting_to_go_out(
    guest: Guest, monkeypatch: pytest.MonkeyPatch
) -> None:
    import providers.qemu.mux as mux_module

    monkeypatch.setattr(mux_module, "OPEN_SECONDS", 1.0)
    mux = await guest.connect()
    busy = await mux.open(["sleep", "300"], ENV)
    assert guest.proc is not None
    guest.proc.send_signal(signal.SIGSTOP)
    try:
        # Fill the connection's buffers toward a guest end that reads nothing.
        feeding = asyncio.create_task(busy.write(os.urandom(wire.WINDOW)))
        await asyncio.sleep(0.3)
        with pytest.raises(Stalled):
            await asyncio.wait_for(mux.open(["true"], ENV), 10)
        feeding.cancel()
    finally:
        guest.proc.send_signal(signal.SIGCONT)


async def test_an_open_cancelled_midway_kills_what_it_started(guest: Guest, tmp_path: Path) -> None:
    mux = await guest.connect()
    marker = tmp_path / "pid"
    opening = asyncio.create_task(
        mux.open(["sh", "-c", f"echo $$ > {marker}; exec sleep 300"], ENV)
    )
    await _written(marker, 0.001)
    if not opening.done():
        opening.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        stream = await opening
        await stream.close()  # it had answered first: close() is the way then
    pid = int(marker.read_text())
    deadline = time.monotonic() + 10
    while _alive(pid):
        assert time.monotonic() < deadline, "a cancelled open left its command running"
        await asyncio.sleep(0.05)
    await mux.aclose()
