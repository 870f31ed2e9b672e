"""common/liboqs.py: asyncssh's look-ups of liboqs answer at once where no liboqs
file is in the loader's folders, without running ldconfig, gcc or ld; other
names, and liboqs where it is there, go to ctypes' own find_library."""

from __future__ import annotations

import ctypes.util
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common import liboqs


@pytest.fixture
def real(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """ctypes' find_library, recorded (and restored after the test)."""
    asked: list[str] = []
    original = ctypes.util.find_library

    def find_library(name: str) -> str | None:
        asked.append(name)
        return original(name)

    monkeypatch.setattr(ctypes.util, "find_library", find_library)
    yield asked


def test_an_absent_liboqs_is_not_searched_for(
    real: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(liboqs, "_BASES", (str(tmp_path),))
    monkeypatch.setenv("LD_LIBRARY_PATH", "")
    spawned: list[Any] = []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: spawned.append(a))
    liboqs.skip_absent_search()
    liboqs.skip_absent_search()  # once only
    assert ctypes.util.find_library("oqs") is None
    assert ctypes.util.find_library("liboqs") is None
    assert real == [] and spawned == []


def test_other_names_and_a_present_liboqs_go_to_ctypes(
    real: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    liboqs.skip_absent_search()
    ctypes.util.find_library("c")
    assert real == ["c"]
    (tmp_path / "liboqs.so.5").write_bytes(b"")
    monkeypatch.setenv("LD_LIBRARY_PATH", str(tmp_path))
    assert liboqs.present()
    ctypes.util.find_library("oqs")
    assert real == ["c", "oqs"]
