"""Engines the tests need: a missing one skips locally and fails in CI."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

IN_CI = bool(os.environ.get("CI"))
TEST_IMAGE = os.environ.get("VENDETTA_TEST_IMAGE", "vendetta/busybox:latest")


def require(engine: str, available: bool, why: str) -> None:
    if available:
        return
    message = f"{engine} is not available: {why} (run `bash scripts/setup.sh`)"
    if IN_CI:
        pytest.fail(f"{message}; CI must run every engine", pytrace=False)
    pytest.skip(message)


def _docker_problem() -> str:
    try:
        import docker

        client = docker.from_env(timeout=5)
        try:
            client.ping()
            client.images.get(TEST_IMAGE)
        finally:
            client.close()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[None]:
    problem = _docker_problem()
    require("Docker (with the test image)", not problem, problem)
    yield


LXD_TEST_IMAGE = os.environ.get("VENDETTA_LXD_TEST_IMAGE", "vendetta/busybox")


def _lxd_problem() -> str:
    try:
        import pylxd

        client = pylxd.Client()
        client.api.storage_pools["default"].get()
        client.api.images.aliases[LXD_TEST_IMAGE].get()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


@pytest.fixture(scope="session")
def lxd_engine() -> Iterator[None]:
    problem = _lxd_problem()
    require("LXD (initialised, with the test image)", not problem, problem)
    yield


def _qemu_problem() -> str:
    try:
        from providers.qemu.provider import DEFAULT_IMAGE, DEFAULT_IMAGE_DIR, IMAGE_FILES
    except ImportError as exc:  # libvirt-python not installed
        return f"{exc} (bash scripts/engine-qemu.sh installs it)"
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        conn = libvirt.open("qemu:///system")
        try:
            conn.getLibVersion()
        finally:
            conn.close()
    except libvirt.libvirtError as exc:
        return f"libvirtd not answering: {exc} (bash scripts/engine-qemu.sh starts it)"
    image = DEFAULT_IMAGE_DIR / DEFAULT_IMAGE
    if not all((image / f).is_file() for f in IMAGE_FILES):
        return f"guest image {image} missing (bash scripts/build-guest-image.sh builds it)"
    return ""


@pytest.fixture(scope="session")
def qemu_engine() -> Iterator[None]:
    problem = _qemu_problem()
    require("libvirt + QEMU (with the guest image)", not problem, problem)
    yield


@pytest.fixture(scope="session")
def sshd_binary() -> Iterator[str]:
    path = shutil.which("sshd") or "/usr/sbin/sshd"
    require("OpenSSH sshd", os.path.exists(path), f"{path} not found")
    yield path


# The longest modules, longest first: run first, so that on two workers
# (scripts/test.sh) neither is left with one of them at the end.
SLOW_FIRST = (
    "e2e/test_crash_consistency.py",
    "e2e/test_load.py",
    "e2e/test_agent_install.py",
    "e2e/test_services.py",
    "e2e/test_editor_ssh.py",
    "e2e/test_nonroot_node.py",
    "e2e/test_editor_sftp_builtin.py",
    "e2e/test_stream_faults.py",
    "e2e/test_node_faults.py",
    "e2e/test_vm_and_lxd_nodes.py",
)


def _slow_rank(item: pytest.Item) -> int:
    name = f"{item.path.parent.name}/{item.path.name}"
    return SLOW_FIRST.index(name) if name in SLOW_FIRST else len(SLOW_FIRST)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=_slow_rank)  # stable: each module's tests stay together, in order
    # Marked tests get their engine fixture, so a missing engine skips or fails them.
    for item in items:
        if item.get_closest_marker("docker") and hasattr(item, "fixturenames"):
            item.fixturenames.insert(0, "docker_engine")
        if item.get_closest_marker("lxd") and hasattr(item, "fixturenames"):
            item.fixturenames.insert(0, "lxd_engine")
        if item.get_closest_marker("qemu") and hasattr(item, "fixturenames"):
            item.fixturenames.insert(0, "qemu_engine")
        if item.get_closest_marker("sshd") and hasattr(item, "fixturenames"):
            item.fixturenames.insert(0, "sshd_binary")
