"""scripts/check_proto_compat.py (in `make lint`): a scratch copy of protos/ with one
wire-breaking change fails it, naming the change; additive changes and the tree itself
pass."""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "check_proto_compat", ROOT / "scripts" / "check_proto_compat.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CHECK = _script()


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    return tmp_path / "protos"


def _edit(protos: Path, name: str, old: str, new: str) -> None:
    path = protos / "vendetta" / "v1" / name
    text = path.read_text()
    assert len(re.findall(old, text)) == 1, old
    path.write_text(re.sub(old, new, text))


def _check(protos: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = CHECK.main(["--protos", str(protos)])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_the_tree_and_additions_pass(scratch: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _check(ROOT / "protos", capsys)[0] == 0
    _edit(
        scratch,
        "coordinator.proto",
        r"message GetWorkspaceRequest \{\n  string name = 1;\n",
        "message GetWorkspaceRequest {\n  string name = 1;\n  bool verbose = 99;\n",
    )
    assert _check(scratch, capsys) == (0, "protos/ are wire compatible with compat-baseline.json\n")


def test_a_renumbered_field_fails(scratch: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _edit(
        scratch,
        "coordinator.proto",
        r"(message GetWorkspaceRequest \{\n  string name = )1;",
        r"\g<1>7;",
    )
    code, out = _check(scratch, capsys)
    assert code == 1
    assert "vendetta.v1.GetWorkspaceRequest.name = 1 renumbered to 7" in out
    assert "breaks wire compatibility" in out


def test_removed_and_retyped_fail(scratch: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _edit(scratch, "coordinator.proto", r"  rpc ListImages\(.*\n", "")
    _edit(scratch, "coordinator.proto", r"  bool follow = 2;", "  int32 follow = 2;")
    _edit(scratch, "coordinator.proto", r"  int32 tail = 3;.*\n", "")
    code, out = _check(scratch, capsys)
    assert code == 1
    assert "rpc vendetta.v1.Coordinator/ListImages removed" in out
    assert "vendetta.v1.StreamLogsRequest.follow = 2 changed type: bool -> int32" in out
    assert "vendetta.v1.StreamLogsRequest.tail = 3 removed (reserve its number instead)" in out


def test_a_removed_field_whose_number_is_reserved_passes(
    scratch: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _edit(scratch, "coordinator.proto", r"  int32 tail = 3;.*\n", "  reserved 3;\n")
    assert _check(scratch, capsys)[0] == 0
