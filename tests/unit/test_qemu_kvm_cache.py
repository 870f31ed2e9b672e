"""The KVM probe's answer is kept for the host's boot, shared by every agent there."""

from __future__ import annotations

from pathlib import Path

import pytest

from providers.qemu import kvm


@pytest.fixture
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path


def test_an_answer_is_remembered_for_the_same_kernel(cache_home: Path, tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel")
    assert kvm._remembered(kernel) is None
    kvm._remember(kernel, (False, "KVM did not boot a guest kernel within 10s"))
    assert (cache_home / "vendetta" / "kvm-probe.json").exists()
    assert kvm._remembered(kernel) == (False, "KVM did not boot a guest kernel within 10s")


def test_another_kernel_or_a_changed_one_is_probed_again(cache_home: Path, tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel")
    kvm._remember(kernel, (True, "KVM works"))
    other = tmp_path / "other"
    other.write_bytes(b"another kernel")
    assert kvm._remembered(other) is None
    kernel.write_bytes(b"a new build of the kernel")
    assert kvm._remembered(kernel) is None


def test_a_broken_cache_file_is_no_answer(cache_home: Path, tmp_path: Path) -> None:
    (cache_home / "vendetta").mkdir()
    (cache_home / "vendetta" / "kvm-probe.json").write_text("{not json")
    assert kvm._remembered(tmp_path / "vmlinuz") is None
