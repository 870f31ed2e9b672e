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


@pytest.fixture(scope="session")
def sshd_binary() -> Iterator[str]:
    path = shutil.which("sshd") or "/usr/sbin/sshd"
    require("OpenSSH sshd", os.path.exists(path), f"{path} not found")
    yield path


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Marked tests get their engine fixture, so a missing engine skips or fails them.
    for item in items:
        if item.get_closest_marker("docker") and hasattr(item, "fixturenames"):
            item.fixturenames.insert(0, "docker_engine")
        if item.get_closest_marker("lxd") and hasattr(item, "fixturenames"):
            item.fixturenames.insert(0, "lxd_engine")
        if item.get_closest_marker("sshd") and hasattr(item, "fixturenames"):
            item.fixturenames.insert(0, "sshd_binary")
