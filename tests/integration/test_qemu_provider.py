"""QemuProvider against the node's real libvirtd: real guests, real guest-agent exec.

One guest is booted for the module and shared by the tests that only need a
running guest (booting takes seconds under TCG); the lifecycle test boots its
own to check that destroy leaves nothing behind.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import libvirt
import pytest
import pytest_asyncio

from common.errors import (
    AlreadyExistsError,
    EngineUnavailableError,
    FailedPreconditionError,
    ImageNotFoundError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
)
from providers.base import EnvironmentSpec, EnvState
from providers.qemu import QemuProvider
from providers.qemu.domain import Files
from providers.qemu.errors import translate
from providers.qemu.provider import DEFAULT_IMAGE

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


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def provider(qemu_engine: None) -> AsyncIterator[QemuProvider]:
    state_dir = Path(tempfile.mkdtemp(prefix="vd-qemu-test-", dir="/tmp"))
    state_dir.chmod(0o755)
    p = QemuProvider(f"test-{uuid.uuid4().hex}", state_dir=state_dir)
    try:
        yield p
    finally:
        for env in await p.list():
            await p.destroy(env.workspace)
        await p.close()
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def guest(provider: QemuProvider) -> AsyncIterator[str]:
    ws = f"guest-{uuid.uuid4().hex[:6]}"
    spec = EnvironmentSpec(
        workspace=ws,
        image=DEFAULT_IMAGE,
        env={"GREETING": "hello from the guest"},
        memory_bytes=384 * 2**20,
        disk_bytes=3 * 2**30,
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
    assert "KVM" in ready.detail or "emulation" in ready.detail
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
async def test_exec_of_a_missing_program_is_not_found(provider: QemuProvider, guest: str) -> None:
    with pytest.raises(NotFoundError):
        await run(provider, guest, "/no/such/program")


@in_module_loop
async def test_errors(provider: QemuProvider, guest: str) -> None:
    with pytest.raises(AlreadyExistsError):
        await provider.create(EnvironmentSpec(workspace=guest, image=DEFAULT_IMAGE))
    with pytest.raises(ImageNotFoundError, match=r"build-guest-image\.sh"):
        await provider.create(EnvironmentSpec(workspace="other", image="no-such-image"))
    with pytest.raises(InvalidArgumentError):
        await provider.create(EnvironmentSpec(workspace="other", image="../etc"))
    assert (await provider.inspect("other")).state is EnvState.ABSENT


@in_module_loop
async def test_lifecycle_leaves_nothing_behind(provider: QemuProvider) -> None:
    ws = f"life-{uuid.uuid4().hex[:6]}"
    created = await provider.create(
        EnvironmentSpec(workspace=ws, image=DEFAULT_IMAGE, command=["sh", "-c", "echo started"])
    )
    assert created.state is EnvState.CREATED
    files = Files.for_domain(provider.state_dir, provider.domain_name(ws))
    assert files.overlay.is_file()
    with pytest.raises(FailedPreconditionError, match="vendetta workspace up"):
        await run(provider, ws, "true")
    assert (await provider.start(ws)).state is EnvState.RUNNING
    out, _, code = await run(provider, ws, "sh", "-c", "echo inside > /root/f; cat /root/f")
    assert (out, code) == (b"inside\n", 0)
    stopped = await provider.stop(ws, timeout=20)
    assert stopped.state is EnvState.STOPPED
    texts = [(r.stream, r.text) async for r in provider.logs(ws, follow=False, tail=None)]
    assert ("stdout", "started") in texts
    assert any(stream == "console" for stream, _ in texts)
    # The disk persists across a stop/start.
    await provider.start(ws)
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


def _error(code: int, message: str) -> libvirt.libvirtError:
    exc = libvirt.libvirtError(message)
    exc.err = (code, 0, message, 2, None, None, None, 0, 0)
    return exc


def test_libvirt_errors_map_to_common_errors() -> None:
    def mapped(code: int, message: str) -> type:
        return type(translate(_error(code, message), uri="qemu:///system", action="doing"))

    assert mapped(libvirt.VIR_ERR_NO_DOMAIN, "no domain") is NotFoundError
    assert mapped(libvirt.VIR_ERR_OPERATION_INVALID, "not running") is FailedPreconditionError
    assert mapped(libvirt.VIR_ERR_ACCESS_DENIED, "denied") is PermissionDeniedError
    down = translate(
        _error(libvirt.VIR_ERR_SYSTEM_ERROR, "Failed to connect socket: No such file"),
        uri="qemu:///system",
        action="doing",
    )
    assert isinstance(down, EngineUnavailableError) and "engine-qemu.sh" in down.message
    memory = translate(
        _error(
            libvirt.VIR_ERR_INTERNAL_ERROR, "cannot set up guest memory: Cannot allocate memory"
        ),
        uri="qemu:///system",
        action="starting",
    )
    assert isinstance(memory, FailedPreconditionError) and "memory" in memory.message
