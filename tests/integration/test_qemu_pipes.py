"""Commands with stdin in a real QEMU guest (the stream port, providers/qemu/mux.py):
many at once on one connection, input and output intact, the port closed to the
guest's users, and a new connection after the guest restarts."""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from providers.base import EnvironmentSpec, Terminal
from providers.qemu import QemuProvider
from providers.qemu.images import DEFAULT_IMAGE
from tests.support.qemu import scratch_provider

pytestmark = pytest.mark.qemu
in_module_loop = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def provider(qemu_engine: None) -> AsyncIterator[QemuProvider]:
    async with scratch_provider("vd-qemu-pipes-") as p:
        yield p


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def guest(provider: QemuProvider) -> AsyncIterator[str]:
    ws = f"pipes-{uuid.uuid4().hex[:6]}"
    spec = EnvironmentSpec(workspace=ws, image=DEFAULT_IMAGE, memory_bytes=384 * 2**20)
    await provider.create(spec)
    await provider.start(ws)
    yield ws
    name = provider.domain_name(ws)
    assert name in provider._pipes.held()  # the tests used its connection
    await provider.destroy(ws)
    # Destroyed: nothing of it kept for the agent's life (a workspace a day adds up).
    assert name not in provider._pipes.held()


async def _run(session: Terminal, data: bytes = b"") -> tuple[bytes, bytes, int | None]:
    async def feed() -> None:
        for i in range(0, len(data), 1 << 20):
            await session.write(data[i : i + (1 << 20)])
        await session.close_stdin()

    feeder = asyncio.create_task(feed())
    out, err, code = bytearray(), bytearray(), None
    async for chunk in session.output():
        out += chunk.stdout
        err += chunk.stderr
        if chunk.exit_code is not None:
            code = chunk.exit_code
    await feeder
    await session.close()
    return bytes(out), bytes(err), code


@in_module_loop
async def test_many_commands_with_input_at_once(provider: QemuProvider, guest: str) -> None:
    blobs = [os.urandom(3 * 2**20 + i) for i in range(6)]
    sessions = [await provider.pipe(guest, ["sh", "-c", "md5sum; echo done >&2"]) for _ in blobs]
    results = await asyncio.wait_for(
        asyncio.gather(*(_run(s, b) for s, b in zip(sessions, blobs, strict=True))), 180
    )
    for blob, (out, err, code) in zip(blobs, results, strict=True):
        assert out.split()[0].decode() == hashlib.md5(blob).hexdigest()
        assert (err, code) == (b"done\n", 0)


@in_module_loop
async def test_the_port_is_not_open_to_users_inside(provider: QemuProvider, guest: str) -> None:
    as_user = ["setpriv", "--reuid", "1000", "--regid", "1000", "--clear-groups"]
    probe = [*as_user, "sh", "-c", "echo x > /dev/virtio-ports/org.vendetta.mux"]
    out, err, code = await _run(await provider.pipe(guest, probe))
    assert code != 0 and b"Permission denied" in err, (out, err, code)


@in_module_loop
async def test_a_restarted_guest_gets_a_new_connection(provider: QemuProvider, guest: str) -> None:
    before = await _run(await provider.pipe(guest, ["cat"]), b"before\n")
    assert before == (b"before\n", b"", 0)
    await provider.stop(guest)
    await provider.start(guest)
    after = await asyncio.wait_for(_run(await provider.pipe(guest, ["cat"]), b"after\n"), 60)
    assert after == (b"after\n", b"", 0)


@in_module_loop
async def test_a_relay_killed_inside_is_replaced(
    provider: QemuProvider, guest: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Root inside kills the relay (a `pkill python3`): the port stays open on the node,
    so the next command gets no answer, and a new relay takes over."""
    import providers.qemu.mux as mux_module

    monkeypatch.setattr(mux_module, "OPEN_SECONDS", 3.0)
    assert await _run(await provider.pipe(guest, ["cat"]), b"1\n") == (b"1\n", b"", 0)
    kill = ["sh", "-c", "kill -9 $(cat /run/vendetta/mux.pid)"]
    async for chunk in provider.exec(guest, kill):  # through the guest agent, as root
        assert chunk.exit_code in (None, 0), chunk
    again = await asyncio.wait_for(_run(await provider.pipe(guest, ["cat"]), b"2\n"), 60)
    assert again == (b"2\n", b"", 0)


@in_module_loop
async def test_a_guest_without_the_stream_port_says_recreate(
    provider: QemuProvider, guest: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a domain defined by an older vendetta looks like: no stream port.
    from common.errors import FailedPreconditionError
    from providers.qemu import provider as qemu_provider

    monkeypatch.setattr(qemu_provider, "mux_socket", lambda _root: "")
    with pytest.raises(FailedPreconditionError, match=rf"recreate it.*destroy {guest}"):
        await provider.pipe(guest, ["cat"])
