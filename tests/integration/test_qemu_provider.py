"""QemuProvider against the node's real libvirtd: real guests, real guest-agent exec.

One guest is booted for the module and shared by the tests that only need a
running guest (booting takes seconds under TCG), terminals included; the
lifecycle test boots its own to check that destroy leaves nothing behind. Both publish a port, so a
real TCP connection on the node's loopback reaches a listener in a guest, on
the first boot and after a restart whose first-picked node port was taken.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import libvirt
import pytest
import pytest_asyncio

from common.errors import (
    AlreadyExistsError,
    EngineUnavailableError,
    FailedPreconditionError,
    ImageNotFoundError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
)
from nodeagent.servicer import LOGIN_SHELL
from providers.base import EnvironmentSpec, EnvState, Terminal
from providers.qemu import QemuProvider, guests, network
from providers.qemu import provider as qemu_provider
from providers.qemu.domain import Files
from providers.qemu.errors import port_taken, translate
from providers.qemu.images import DEFAULT_IMAGE
from tests.support.qemu import scratch_provider

pytestmark = pytest.mark.qemu
# The async tests share the module's event loop, and so its booted guest.
in_module_loop = pytest.mark.asyncio(loop_scope="module")


async def run(
    provider: QemuProvider,
    ws: str,
    *argv: str,
    env: dict[str, str] | None = None,
    workdir: str = "",
) -> tuple[bytes, bytes, int]:
    out, err, code = b"", b"", None
    async for chunk in provider.exec(ws, list(argv), env=env, workdir=workdir):
        out += chunk.stdout
        err += chunk.stderr
        if chunk.exit_code is not None:
            code = chunk.exit_code
    assert code is not None
    return out, err, code


def node_port(address: str) -> int:
    host, _, port = address.rpartition(":")
    assert host == "127.0.0.1", address  # the node's loopback, never another address
    return int(port)


async def talk(address: str, request: bytes = b"", within: float = 30) -> bytes:
    """What the listener behind ``address`` answers; retried until it has started."""
    deadline = time.monotonic() + within
    while True:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", node_port(address))
            try:
                writer.write(request)
                await writer.drain()
                answer = await asyncio.wait_for(reader.read(), 10)
            finally:
                writer.close()
            if answer:
                return answer
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing answered at {address} within {within:.0f}s")
        await asyncio.sleep(0.3)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def provider(qemu_engine: None) -> AsyncIterator[QemuProvider]:
    async with scratch_provider("vd-qemu-test-") as p:
        yield p


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def guest(provider: QemuProvider) -> AsyncIterator[str]:
    ws = f"guest-{uuid.uuid4().hex[:6]}"
    spec = EnvironmentSpec(
        workspace=ws,
        image=DEFAULT_IMAGE,
        env={"GREETING": "hello from the guest"},
        memory_bytes=384 * 2**20,
        disk_bytes=3 * 2**30,
        ports=(7000,),
    )
    await provider.create(spec)
    status = await provider.start(ws)
    assert status.state is EnvState.RUNNING
    yield ws
    await provider.destroy(ws)


@in_module_loop
async def test_readiness_names_the_accelerator_and_image(provider: QemuProvider) -> None:
    ready = await provider.readiness()
    assert ready.ready, ready.detail
    for _ in range(30):  # the KVM test boot goes on in the background for up to 10 s
        if "checking whether KVM" not in ready.detail:
            break
        await asyncio.sleep(1)
        ready = await provider.readiness()
    assert "KVM" in ready.detail or "emulation" in ready.detail, ready.detail
    assert DEFAULT_IMAGE in ready.images


@in_module_loop
async def test_exec_runs_inside_the_guest(provider: QemuProvider, guest: str) -> None:
    # The guest's own kernel, not the host's: this is a VM, not a container.
    out, _, code = await run(provider, guest, "cat", "/proc/cmdline")
    assert code == 0 and b"root=/dev/vda" in out
    out, err, code = await run(
        provider,
        guest,
        "sh",
        "-c",
        'echo "$GREETING"; echo "$EXTRA" >&2; exit 7',
        env={"EXTRA": "x"},
    )
    assert (out, err, code) == (b"hello from the guest\n", b"x\n", 7)
    out, _, code = await run(provider, guest, "pwd", workdir="/tmp")
    assert (out, code) == (b"/tmp\n", 0)


@in_module_loop
async def test_disk_and_memory_follow_the_spec(provider: QemuProvider, guest: str) -> None:
    out, _, code = await run(provider, guest, "sh", "-c", "df -k / | tail -n 1")
    assert code == 0
    size_kib = int(out.split()[1])
    assert size_kib > 2.5 * 2**20  # the 2 GiB image grew to the 3 GiB overlay
    out, _, _ = await run(provider, guest, "sh", "-c", "grep MemTotal /proc/meminfo")
    assert 250 * 1024 < int(out.split()[1]) <= 384 * 1024


@in_module_loop
async def test_published_port_reaches_a_listener_in_the_guest(
    provider: QemuProvider, guest: str
) -> None:
    status = await provider.inspect(guest)
    assert set(status.ports) == {7000}
    address = status.ports[7000]
    port = node_port(address)
    # Nothing listens inside yet: the node side accepts, then closes at once.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert await asyncio.wait_for(reader.read(), 10) == b""
    except ConnectionResetError:
        pass
    finally:
        writer.close()
    _, _, code = await run(
        provider,
        guest,
        "sh",
        "-c",
        "nc -ll -p 7000 -e sh -c 'echo pong-$(cat /proc/sys/kernel/hostname)' "
        "</dev/null >/dev/null 2>&1 &",
    )
    assert code == 0
    assert await talk(address) == b"pong-vendetta\n"  # the guest's hostname, not the node's
    # Published on 127.0.0.1 alone, not on every address of the node.
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.2", port)


@in_module_loop
async def test_a_guest_with_ports_reaches_nothing_itself(
    provider: QemuProvider, guest: str
) -> None:
    # A listener on the node's loopback: QEMU's 10.0.2.2 would lead to it without restrict=on.
    accepted: list[bool] = []

    def on_connect(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        accepted.append(True)
        w.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        _, _, code = await run(provider, guest, "sh", "-c", f"echo x | nc -w 2 10.0.2.2 {port}")
    finally:
        server.close()
        await server.wait_closed()
    assert code != 0 and accepted == []
    _, _, code = await run(provider, guest, "sh", "-c", "ip route | grep -q default")
    assert code != 0  # no route out


@in_module_loop
async def test_exec_of_a_missing_program_is_not_found(provider: QemuProvider, guest: str) -> None:
    with pytest.raises(NotFoundError):
        await run(provider, guest, "/no/such/program")


@in_module_loop
async def test_errors(provider: QemuProvider, guest: str) -> None:
    with pytest.raises(AlreadyExistsError) as twice:
        await provider.create(EnvironmentSpec(workspace=guest, image=DEFAULT_IMAGE))
    assert str(twice.value).startswith(f"workspace {guest!r} already has ")  # the base's words
    assert "qemu" in str(twice.value)
    assert f"`vendetta workspace destroy {guest}`" in str(twice.value)
    with pytest.raises(ImageNotFoundError, match=r"build-guest-image\.sh"):
        await provider.create(EnvironmentSpec(workspace="other", image="no-such-image"))
    with pytest.raises(InvalidArgumentError) as bad:
        await provider.create(EnvironmentSpec(workspace="other", image="../etc"))
    assert "invalid guest image name '../etc': a directory name under" in str(bad.value)
    assert (await provider.inspect("other")).state is EnvState.ABSENT


class Screen:
    """What a terminal printed, read by a task; ``shows`` waits for a text."""

    def __init__(self, terminal: Terminal) -> None:
        self.terminal = terminal
        self.out = bytearray()
        self.codes: list[int] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for chunk in self.terminal.output():
            self.out += chunk.stdout + chunk.stderr
            if chunk.exit_code is not None:
                self.codes.append(chunk.exit_code)

    async def type(self, text: str) -> None:
        await self.terminal.write(text.encode())

    async def shows(self, text: str, within: float = 30) -> None:
        deadline = time.monotonic() + within
        while text.encode() not in self.out:
            if self.reader.done():
                self.reader.result()
                raise AssertionError(f"ended before {text!r} showed:\n{self.out.decode()}")
            assert time.monotonic() < deadline, f"{text!r} never showed:\n{self.out.decode()}"
            await asyncio.sleep(0.05)

    async def exit_code(self) -> int:
        await asyncio.wait_for(self.reader, 30)
        assert len(self.codes) == 1, self.codes
        return self.codes[0]


@in_module_loop
async def test_terminal_login_shell_one_at_a_time(provider: QemuProvider, guest: str) -> None:
    # No argv: the agent's login shell, with the workspace's environment and TERM.
    first = await provider.attach(guest, LOGIN_SHELL, rows=24, cols=80, env={"TERM": "vt100"})
    screen = Screen(first)
    try:
        with pytest.raises(FailedPreconditionError, match="already open"):
            await provider.attach(guest, ["/bin/sh"], rows=24, cols=80)
        await screen.type('echo "$TERM-$((6*7)) $GREETING"; tty\n')
        await screen.shows("vt100-42 hello from the guest")
        await screen.shows("/dev/hvc0")
        # ^C reaches the foreground job through the terminal's line discipline.
        await screen.type("sleep 300\n")
        await asyncio.sleep(1)
        await screen.type("\x03")
        await screen.type("echo interrupted-$((1+1))\n")
        await screen.shows("interrupted-2")
        await screen.type("sleep 600 &\n")
        await asyncio.sleep(1)
    finally:
        screen.reader.cancel()
        await asyncio.gather(screen.reader, return_exceptions=True)
        await first.close()  # hangs the shell up, its background job too
    out, _, _ = await run(provider, guest, "ps", "-o", "args")
    assert b"sleep 600" not in out and b"sleep 300" not in out
    # The console is free again; argv reaches the guest as given, never parsed by a shell.
    second = await provider.attach(
        guest,
        ["sh", "-c", 'printf "[%s]" "$@"; exit 5', "sh", "a b", "$HOME", "it's"],
        rows=10,
        cols=40,
    )
    screen = Screen(second)
    try:
        assert await screen.exit_code() == 5
        assert b"[a b][$HOME][it's]" in screen.out
    finally:
        await second.close()


@in_module_loop
async def test_terminal_of_a_guest_without_its_console_says_recreate(
    provider: QemuProvider, guest: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a domain defined before terminals existed looks like: no terminal console.
    monkeypatch.setattr(qemu_provider, "terminal_console", lambda _root: "")
    with pytest.raises(FailedPreconditionError, match=rf"Recreate.*destroy {guest}"):
        await provider.attach(guest, ["/bin/sh"], rows=24, cols=80)


WEB = (
    "echo started; mkdir -p /www; echo hello-$((6*7)) > /www/index.html; "
    "exec httpd -f -p 80 -h /www"
)


@in_module_loop
async def test_destroy_without_a_guest_removes_what_a_cut_short_create_left(
    provider: QemuProvider,
) -> None:
    # An agent killed between a create's disk and its domain leaves the disk alone; the
    # reconciler rolls the create back with a destroy, which must take it (issue 15).
    ws = f"cut-{uuid.uuid4().hex[:6]}"
    files = Files.for_domain(provider.state_dir, provider.domain_name(ws))
    for path in (files.overlay, files.console):
        path.write_bytes(b"left")
    await provider.destroy(ws)
    assert not files.overlay.exists() and not files.console.exists()


@in_module_loop
async def test_a_cancelled_destroy_leaves_no_disk(
    provider: QemuProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The coordinator killed mid-destroy cancels the agent's call while its thread goes on
    # undefining the domain: the disk went with it, never after the await (issue 15).
    ws = f"cncl-{uuid.uuid4().hex[:6]}"
    await provider.create(EnvironmentSpec(workspace=ws, image=DEFAULT_IMAGE))
    files = Files.for_domain(provider.state_dir, provider.domain_name(ws))
    assert files.overlay.is_file()
    real_remove = guests.remove
    done = threading.Event()  # the thread's whole call, disk included, has returned
    removing = threading.Event()  # the thread is in the domain's removal

    def slow_remove(dom: libvirt.virDomain) -> None:
        removing.set()
        time.sleep(0.5)  # the call is cancelled meanwhile
        real_remove(dom)

    monkeypatch.setattr(guests, "remove", slow_remove)
    real_call = provider._libvirt.call_sync

    def call_sync(action: str, fn: Any) -> Any:
        try:
            return real_call(action, fn)
        finally:
            done.set()

    monkeypatch.setattr(provider._libvirt, "call_sync", call_sync)
    task = asyncio.create_task(provider.destroy(ws))
    # Cancelled while its thread removes the domain (a fixed 0.2 s could come before the
    # thread even started on a busy machine: the call then never ran, the guest stayed).
    assert await asyncio.to_thread(removing.wait, 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(done.wait, 10)
    assert (await provider.inspect(ws)).state is EnvState.ABSENT
    assert not files.overlay.exists(), "the disk outlived its domain"


@in_module_loop
async def test_lifecycle_leaves_nothing_behind(
    provider: QemuProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = f"life-{uuid.uuid4().hex[:6]}"
    created = await provider.create(
        EnvironmentSpec(workspace=ws, image=DEFAULT_IMAGE, command=["sh", "-c", WEB], ports=(80,))
    )
    assert created.state is EnvState.CREATED and created.ports == {}
    files = Files.for_domain(provider.state_dir, provider.domain_name(ws))
    assert files.overlay.is_file()
    with pytest.raises(FailedPreconditionError, match="vendetta workspace up"):
        await run(provider, ws, "true")
    started = await provider.start(ws)
    assert started.state is EnvState.RUNNING
    get = b"GET / HTTP/1.0\r\n\r\n"
    assert (await talk(started.ports[80], get)).endswith(b"\r\n\r\nhello-42\n")
    out, _, code = await run(provider, ws, "sh", "-c", "echo inside > /root/f; cat /root/f")
    assert (out, code) == (b"inside\n", 0)
    stopped = await provider.stop(ws, timeout=20)
    assert stopped.state is EnvState.STOPPED and stopped.ports == {}
    texts = [(r.stream, r.text) async for r in provider.logs(ws, follow=False, tail=None)]
    assert ("stdout", "started") in texts
    assert any(stream == "console" for stream, _ in texts)
    # The disk persists across a stop/start. The node port first picked for the
    # restart is taken before QEMU binds it: the start picks another.
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    picks: list[list[int]] = []
    real_pick = network.pick_node_ports

    def pick(count: int) -> list[int]:
        picks.append([taken.getsockname()[1]] if not picks else real_pick(count))
        return picks[-1]

    monkeypatch.setattr(network, "pick_node_ports", pick)
    try:
        restarted = await provider.start(ws)
    finally:
        taken.close()
    assert len(picks) == 2 and node_port(restarted.ports[80]) == picks[1][0]
    assert (await talk(restarted.ports[80], get)).endswith(b"hello-42\n")
    out, _, _ = await run(provider, ws, "cat", "/root/f")
    assert out == b"inside\n"
    await provider.destroy(ws)
    await provider.destroy(ws)
    assert (await provider.inspect(ws)).state is EnvState.ABSENT
    conn = libvirt.open(provider.uri)
    try:
        assert provider.domain_name(ws) not in [d.name() for d in conn.listAllDomains(0)]
    finally:
        conn.close()
    leftovers = [p.name for p in provider.state_dir.iterdir() if provider.domain_name(ws) in p.name]
    assert leftovers == []


def _error(code: int, message: str, domain: int = 0) -> libvirt.libvirtError:
    exc = libvirt.libvirtError(message)
    exc.err = (code, domain, message, 2, None, None, None, 0, 0)
    return exc


def test_libvirt_errors_map_to_common_errors() -> None:
    def mapped(code: int, message: str, domain: int = 0) -> type:
        error = _error(code, message, domain)
        return type(translate(error, uri="qemu:///system", action="doing"))

    assert mapped(libvirt.VIR_ERR_NO_DOMAIN, "no domain") is NotFoundError
    assert mapped(libvirt.VIR_ERR_OPERATION_INVALID, "not running") is FailedPreconditionError
    assert mapped(libvirt.VIR_ERR_ACCESS_DENIED, "denied") is PermissionDeniedError
    # What libvirt says when the socket is not there: a system error of its RPC layer.
    down = translate(
        _error(
            libvirt.VIR_ERR_SYSTEM_ERROR,
            "Failed to connect socket to '/run/libvirt/libvirt-sock': No such file or directory",
            libvirt.VIR_FROM_RPC,
        ),
        uri="qemu:///system",
        action="doing",
    )
    assert isinstance(down, EngineUnavailableError) and "engine-qemu.sh" in down.message
    refused = translate(
        _error(
            libvirt.VIR_ERR_SYSTEM_ERROR,
            "Failed to connect socket to '/run/libvirt/libvirt-sock': Permission denied",
            libvirt.VIR_FROM_RPC,
        ),
        uri="qemu:///system",
        action="doing",
    )
    assert isinstance(refused, PermissionDeniedError) and "libvirt group" in refused.message
    assert "/run/libvirt/libvirt-sock" in refused.message
    no_polkit = translate(
        _error(
            libvirt.VIR_ERR_INTERNAL_ERROR,
            "internal error: Unable to get system bus connection: Could not connect",
        ),
        uri="qemu:///system",
        action="doing",
    )
    assert isinstance(no_polkit, PermissionDeniedError)
    assert 'auth_unix_rw = "none"' in no_polkit.message
    memory = translate(
        _error(
            libvirt.VIR_ERR_INTERNAL_ERROR, "cannot set up guest memory: Cannot allocate memory"
        ),
        uri="qemu:///system",
        action="starting",
    )
    assert isinstance(memory, FailedPreconditionError) and "memory" in memory.message
    # Another domain's name taken: libvirt has no code of its own for it.
    taken = "domain 'vd-x' already exists with uuid 8f7d3c52-4a5e-4a65-9a39-4d2b3f0b9f0e"
    assert mapped(libvirt.VIR_ERR_OPERATION_FAILED, taken) is AlreadyExistsError
    # The guest agent could not start a program: not found, and only that.
    missing = (
        "internal error: unable to execute QEMU agent command 'guest-exec': Failed to "
        "execute child process \u201c/no/such\u201d (No such file or directory)"
    )
    assert mapped(libvirt.VIR_ERR_INTERNAL_ERROR, missing, libvirt.VIR_FROM_QEMU) is NotFoundError
    other = "Cannot access storage file '/x/vmlinuz': No such file or directory"
    assert mapped(libvirt.VIR_ERR_INTERNAL_ERROR, other, libvirt.VIR_FROM_QEMU) is InternalError


def test_a_taken_node_port_is_recognised() -> None:
    taken = _error(
        libvirt.VIR_ERR_INTERNAL_ERROR,
        "internal error: qemu unexpectedly closed the monitor: qemu-system-x86_64: -netdev "
        "user,id=vdnet0,restrict=on,ipv6=off,hostfwd=tcp:127.0.0.1:41000-10.0.2.15:3000: "
        "Could not set up host forwarding rule 'tcp:127.0.0.1:41000-10.0.2.15:3000'",
        libvirt.VIR_FROM_QEMU,
    )
    assert port_taken(taken)
    memory = "internal error: cannot set up guest memory"
    assert not port_taken(_error(libvirt.VIR_ERR_INTERNAL_ERROR, memory, libvirt.VIR_FROM_QEMU))
