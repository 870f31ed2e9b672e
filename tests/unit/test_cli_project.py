"""`vendetta init` and `vendetta config validate`, through the real typer app."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from common.config import load_config

runner = CliRunner()


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    project = tmp_path / "My Project_1"
    project.mkdir()
    monkeypatch.chdir(project)
    return project


def test_init_writes_a_valid_starter_named_after_the_folder() -> None:
    result = runner.invoke(app, ["init"])
    assert result.exit_code == 0, result.output
    cfg = load_config(Path(".vendetta/config.yaml"))
    assert cfg.name == "my-project-1" and cfg.provider == "docker"
    assert "# services:" in Path(".vendetta/config.yaml").read_text()  # commented examples


def test_init_refuses_to_overwrite_without_force() -> None:
    assert runner.invoke(app, ["init", "--name", "one"]).exit_code == 0
    again = runner.invoke(app, ["init", "--name", "two"])
    assert again.exit_code == 1 and "pass --force" in again.output
    assert load_config(Path(".vendetta/config.yaml")).name == "one"
    assert runner.invoke(app, ["init", "--name", "two", "--force"]).exit_code == 0
    assert load_config(Path(".vendetta/config.yaml")).name == "two"


def test_init_rejects_what_validation_would_reject() -> None:
    bad = runner.invoke(app, ["init", "--provider", "vmware"])
    assert bad.exit_code == 1 and "provider" in bad.output
    assert not Path(".vendetta/config.yaml").exists()


def test_validate_reports_each_problem_with_its_key() -> None:
    Path("c.yaml").write_text(
        "name: p\nservices:\n  a: {command: x, depends_on: [b], port: 80}\n"
        "  c: {command: y, port: 80, colour: red}\n"
    )
    result = runner.invoke(app, ["config", "validate", "c.yaml"])
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert "c.yaml" in text and "services.c.colour: unknown key" in text
    result = runner.invoke(app, ["config", "validate", "--json", "c.yaml"])
    data = json.loads(result.output)
    assert data["valid"] is False and "colour" in data["error"]


def test_validate_ok_and_json() -> None:
    runner.invoke(app, ["init"])
    ok = runner.invoke(app, ["config", "validate"])
    assert ok.exit_code == 0 and "valid" in ok.output
    data = json.loads(runner.invoke(app, ["config", "validate", "--json"]).output)
    assert data["valid"] is True and data["config"]["name"] == "my-project-1"


def test_validate_missing_file_says_how_to_create_one() -> None:
    result = runner.invoke(app, ["config", "validate", "nope.yaml"])
    assert result.exit_code == 1 and "vendetta init" in result.output


def test_since_accepts_durations_and_times_and_explains_mistakes() -> None:
    from cli.workspace import parse_since

    now = 1_800_000_000.0
    assert parse_since("10m", now) == int((now - 600) * 1e9)
    assert parse_since("2h", now) == int((now - 7200) * 1e9)
    assert parse_since("2026-11-22T10:00:00+00:00") == 1_795_341_600 * 10**9
    with pytest.raises(ValueError, match="use a duration like 30s"):
        parse_since("yesterday")
    bad = runner.invoke(app, ["workspace", "logs", "w", "--since", "soon"])
    assert bad.exit_code == 2 and "--since 'soon'" in bad.output
