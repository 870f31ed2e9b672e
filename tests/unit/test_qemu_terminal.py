"""QEMU terminals without a guest: the console in the domain XML, and the guest-side
script run by the guest's own shell (busybox) on a pseudo-terminal of this host."""

from __future__ import annotations

import os
import select
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.errors import FailedPreconditionError
from common.paths import MAX_SOCKET_PATH
from providers.qemu import agent as qemu_agent
from providers.qemu.domain import (
    TERMINAL_ALIAS,
    Files,
    socket_path_problem,
    terminal_console,
)
from providers.qemu.terminal import GUEST_SCRIPT, ready_token
from tests.support.qemu import domain_root

BUSYBOX = "/bin/busybox"


def test_the_terminal_console_is_a_virtio_console_libvirt_can_open() -> None:
    files = Files.for_domain(Path("/var/lib/vendetta/qemu"), "vd-ws-a1")
    root = domain_root(files)
    # A pty: libvirt opens consoles of that kind only (virDomainOpenConsole), and an
    # agent run as a libvirt-group user cannot open QEMU's own sockets.
    (console,) = [c for c in root.iterfind("devices/console") if c.get("type") == "pty"]
    target = console.find("target")
    assert target is not None and target.get("type") == "virtio"
    assert terminal_console(root) == TERMINAL_ALIAS
    # The serial console (the log) is still the first console: the kernel's ttyS0.
    first = root.find("devices/console/target")
    assert first is not None and first.get("type") == "serial"
    # A domain of before (a unix-socket console) has none libvirt can open.
    console.set("type", "unix")
    assert terminal_console(root) == ""
    # A domain from before terminals existed has no such console.
    root.find("devices").remove(console)  # type: ignore[union-attr]
    assert terminal_console(root) == ""


def test_socket_paths_fit_for_the_longest_workspace_name() -> None:
    domain = f"vd-{'w' * 63}-abcdef12"
    files = Files.for_domain(Path("/var/lib/vendetta/qemu"), domain)
    assert len(str(files.mux_socket)) <= MAX_SOCKET_PATH
    assert "agent.sock" in socket_path_problem(files)  # the agent's socket is the longer one
    assert socket_path_problem(Files.for_domain(Path("/var/lib/vendetta/qemu"), "vd-ws-a1")) == ""


@pytest.fixture()
def guest_bin(tmp_path: Path) -> Iterator[Path]:
    """A PATH of busybox applets: the guest's userland."""
    if not os.access(BUSYBOX, os.X_OK):
        pytest.skip("busybox-static not installed (scripts/setup.sh installs it)")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for applet in ("sh", "setsid", "stty", "stat", "kill", "printf", "cat", "sleep", "tty"):
        (bin_dir / applet).symlink_to(BUSYBOX)
    yield bin_dir
    shutil.rmtree(bin_dir, ignore_errors=True)


def _script(bin_dir: Path, *args: str) -> list[str]:
    return [str(bin_dir / "sh"), "-c", GUEST_SCRIPT, "vendetta-terminal", *args]


def _read_until(fd: int, wanted: bytes, within: float = 10) -> bytes:
    out = b""
    deadline = time.monotonic() + within
    while wanted not in out:
        assert time.monotonic() < deadline, out
        if select.select([fd], [], [], 0.1)[0]:
            try:
                out += os.read(fd, 4096)
            except OSError:  # EIO: nobody has the device open (yet, or any more)
                time.sleep(0.02)
    return out


def test_a_session_runs_argv_verbatim_on_its_sized_terminal(guest_bin: Path) -> None:
    master, slave = os.openpty()
    device = os.ttyname(slave)
    os.close(slave)  # the script opens the device itself, as the guest's console
    env = {"PATH": str(guest_bin)}
    argv = ["sh", "-c", 'tty; stty size; printf "[%s]" "$@"; read x; echo "got $x"; exit 7']
    argv += ["sh", "a b", "$HOME", "it's", "*"]
    proc = subprocess.Popen(
        _script(guest_bin, device, "start", "n0nce", "30", "120", *argv), env=env
    )
    try:
        out = _read_until(master, ready_token("n0nce"))
        # Input typed once the token showed is the command's, not lost.
        os.write(master, b"typed\n")
        out += _read_until(master, b"got typed")
        after = out.split(ready_token("n0nce"), 1)[1]
        # The terminal echoes what was typed whenever it arrives, maybe amid the output.
        after = after.replace(b"typed\r\n", b"", 1)
        assert f"{device}\r\n30 120\r\n".encode() in after
        assert b"[a b][$HOME][it's][*]" in after
        assert proc.wait(10) == 7  # the started process is the session: its exit code
        # resize sets the window size of the device.
        resize = subprocess.run(_script(guest_bin, device, "resize", "20", "100"), env=env)
        assert resize.returncode == 0
        size = subprocess.run(
            [str(guest_bin / "stty"), "-F", device, "size"], env=env, capture_output=True
        )
        assert size.stdout == b"20 100\n"
    finally:
        proc.kill()
        proc.wait()
        os.close(master)


def test_hangup_ends_the_session_and_a_new_one_replaces_a_stale_one(guest_bin: Path) -> None:
    master, slave = os.openpty()
    device = os.ttyname(slave)
    os.close(slave)
    env = {"PATH": str(guest_bin)}
    shell = ["sh", "-c", 'sleep 300 & echo "bg=$!="; exec sleep 300']
    first = subprocess.Popen(
        _script(guest_bin, device, "start", "one", "24", "80", *shell), env=env
    )
    second: subprocess.Popen[bytes] | None = None
    try:
        out = _read_until(master, b"=\r\n")
        background = int(out.split(b"bg=")[1].split(b"=")[0])
        # A new session hangs up what an earlier one left on the console.
        second = subprocess.Popen(
            _script(guest_bin, device, "start", "two", "24", "80", "sleep", "300"), env=env
        )
        _read_until(master, ready_token("two"))
        assert first.wait(10) == -1  # SIGHUP
        deadline = time.monotonic() + 10
        while Path(f"/proc/{background}").exists():  # its background job too
            assert time.monotonic() < deadline
            time.sleep(0.05)
        subprocess.run(_script(guest_bin, device, "hangup"), env=env, check=True)
        assert second.wait(10) == -1
    finally:
        for proc in (first, second):
            if proc is not None:
                proc.kill()
                proc.wait()
        os.close(master)


def test_a_session_that_ends_before_its_output_arrives_is_still_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The guest agent may report a quick command done before QEMU has passed on
    its console output: the ready token still arrives, and what follows it counts."""
    from providers.qemu import terminal

    ours, guest = socket.socketpair()
    token = terminal.ready_token("n0nce")
    monkeypatch.setattr(terminal, "FIRST_POLL", 0.05)
    monkeypatch.setattr(qemu_agent, "exec_status", lambda _dom, _pid: (True, 5, b"", b""))

    def late_output() -> None:
        time.sleep(0.3)  # after the first poll has seen the command exit
        guest.sendall(token + b"[a b]")

    writer = threading.Thread(target=late_output)
    writer.start()
    try:
        assert terminal._await_ready(ours, object(), 1, token, "ws") == b"[a b]"
    finally:
        writer.join()
        ours.close()
        guest.close()


def test_a_session_that_ends_with_nothing_said_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from providers.qemu import terminal

    ours, guest = socket.socketpair()
    monkeypatch.setattr(terminal, "FIRST_POLL", 0.05)
    monkeypatch.setattr(qemu_agent, "exec_status", lambda _dom, _pid: (True, 5, b"", b""))
    try:
        with pytest.raises(FailedPreconditionError, match="ended as it started"):
            terminal._await_ready(ours, object(), 1, terminal.ready_token("x"), "ws")
    finally:
        ours.close()
        guest.close()
