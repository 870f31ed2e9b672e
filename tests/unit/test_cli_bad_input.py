"""The CLI's own checks of bad input (issue 15, defects 3-5), through the real typer
app: one `error:` line and a non-zero exit before any call, never a traceback.

No coordinator runs here: a check that let the value through would end in "the
coordinator is not running" (or a protobuf ValueError) instead of the line asserted.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cli import checks, main
from cli.main import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def no_coordinator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("VENDETTA_HOME", str(home))
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "300")
    monkeypatch.chdir(tmp_path)
    return home


def one_error(args: list[str], code: int | None = None) -> str:
    """Run the CLI; it must fail with one `error:` line (and no exception)."""
    result = runner.invoke(app, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{args}: raised {result.exception!r}"
    )
    assert result.exit_code != 0, result.output
    if code is not None:
        assert result.exit_code == code, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output and "\x1b" not in result.output
    return lines[0]


BIG = "99999999999999999999"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["workspace", "logs", "w", "--tail", BIG], f"--tail {BIG}: use 0 (all lines)"),
        (["workspace", "logs", "w", "--tail", "-1"], "--tail -1: use 0"),
        (["workspace", "logs", "w", "--since", "99999999d"], "is before 1970 or after 2262"),
        (["workspace", "logs", "w", "--since", "9999-12-31"], "is before 1970 or after 2262"),
        (["workspace", "logs", "w", "--since", "\u00b2m"], "use a duration like 30s"),
        (["workspace", "logs", "w", "--service", "Web!"], "invalid service name 'Web!'"),
        (["node", "add", "n1", "h", "--port", BIG], f"port {BIG} is not a TCP port"),
        (["node", "add", "n1", "h", "--port", "0"], "port 0 is not a TCP port"),
        (["node", "add", "n1", "h", "--grace", "nan"], "--grace nan: use seconds"),
        (["node", "add", "n1", "h", "--grace", "-1"], "--grace -1: use seconds"),
        (["node", "add", "n1", "h", "--grace", "1e400"], "--grace inf: use seconds"),
        (["workspace", "create", "w", "--remote", ""], "an empty node name"),
        (["workspace", "create", "w", "--remote", " "], "an empty node name"),
        (["workspace", "create", "w", "--remote", "Bad_Node"], "invalid node name"),
        (["workspace", "list", "--node", "n" * 10_000], "(10000 characters)"),
        (["workspace", "create", "w", "--provider", "p" * 10_000], "unknown provider 'ppp"),
        (["image", "list", "local", "--provider", "vbox"], "unknown provider 'vbox'"),
        (["image", "import", "local", ".", "--provider", "x"], "unknown provider 'x'"),
        (
            ["node", "add", "n1", "h", "--agent-command", "'unbalanced"],
            "cannot split the command ''unbalanced': no closing quotation",
        ),
    ],
)
def test_option_values_are_checked_before_any_call(args: list[str], expected: str) -> None:
    assert expected in one_error(args, code=2)


@pytest.mark.parametrize(
    "args",
    [
        ["workspace", "status", "a" * 10_000],
        ["workspace", "up", "a" * 10_000],
        ["workspace", "exec", "a" * 10_000, "--", "true"],
        ["node", "status", "n" * 10_000],
        ["node", "remove", "n" * 10_000],
        ["node", "add", "n" * 10_000, "h"],
        ["image", "list", "n" * 10_000],
    ],
)
def test_a_huge_name_gets_the_name_rule(args: list[str]) -> None:
    line = one_error(args, code=2)
    assert "name 'aaaa" in line or "name 'nnnn" in line
    assert "(10000 characters)" in line and "1-63 characters" in line and len(line) < 400


def test_a_name_with_terminal_escapes_is_shown_escaped() -> None:
    line = one_error(["workspace", "up", "ws\x1b[31m\u202eevil"], code=2)
    assert "'ws\\x1b[31m\\u202eevil'" in line and "\u202e" not in line


def test_config_paths_that_are_not_config_files(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00name")
    (tmp_path / "deep.yaml").write_text("[" * 3000 + "]" * 3000)
    cases = {
        "/dev/null": "is a device",  # /dev/zero: the same, but endless before
        str(tmp_path / "fifo"): "is a FIFO",
        str(tmp_path): "is a directory",
        str(tmp_path / "bin.yaml"): "is a binary file",
        str(tmp_path / "deep.yaml"): "nest",
    }
    for path, expected in cases.items():
        assert expected in one_error(["config", "validate", path], code=1)
        assert expected in one_error(["workspace", "create", "w", "--config", path], code=1)


def test_image_import_refuses_devices_and_fifos(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    for path in ("/dev/zero", str(tmp_path / "fifo")):
        line = one_error(["image", "import", "local", path, "--provider", "docker"], code=1)
        assert f"{path}: not a regular file or a folder" in line


def test_markup_in_a_path_is_printed_as_is(tmp_path: Path) -> None:
    # rich read "[/x]" as a closing tag: MarkupError, a traceback, before
    line = one_error(["config", "validate", str(tmp_path / "[/x]" / "[red]c.yaml")], code=1)
    assert "[/x]/[red]c.yaml: no such file" in line


def test_provider_names_are_the_configs() -> None:
    from common.config import _PROVIDER_ALIASES, PROVIDERS

    assert set(checks.PROVIDER_NAMES) == set(PROVIDERS) | set(_PROVIDER_ALIASES)


def test_grace_checks_of_server_start() -> None:
    # `server start` itself would start a coordinator: its check, called directly.
    for bad in (float("nan"), float("inf"), 0.0, -1.0, 86401.0):
        with pytest.raises(typer.Exit):
            checks.node_grace(bad)
    assert checks.node_grace(None) is None and checks.node_grace(15.0) == 15.0


def test_an_unexpected_exception_is_one_line_and_a_log(
    no_coordinator: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken() -> None:
        raise RuntimeError("boom\x1b[2J")

    monkeypatch.setattr(main, "app", broken)
    with pytest.raises(SystemExit) as info:
        main.main()
    assert info.value.code == 70
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "unexpected RuntimeError: boom\\x1b[2J - a bug in vendetta" in lines[0]
    log = no_coordinator / "cli-errors.log"
    assert str(log) in lines[0]
    assert "Traceback" in log.read_text() and "RuntimeError: boom" in log.read_text()
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


def test_service_output_in_a_status_is_text_not_markup(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A detail quotes a service's output or an error: "[/x]" raised MarkupError before.
    from rich.console import Console

    from cli.workspace import _show

    # Room for the table: on 80 columns (a test worker: no terminal, and the console
    # made with whatever COLUMNS said then) the detail column is cut short. The same
    # console as cli.output's, wider.
    wide = Console(highlight=False, soft_wrap=True, emoji=False, width=200)
    monkeypatch.setattr("cli.workspace.out", wide)
    from vendetta.v1 import common_pb2
    from vendetta.v1 import coordinator_pb2 as pb

    ws = pb.Workspace(name="w", detail="exited: [/x] \x1b[2J")
    ws.services.append(common_pb2.ServiceStatus(name="web", detail="[bold]Error[/bold] [/etc]"))
    _show(ws, False)
    shown = capsys.readouterr().out
    assert "exited: [/x] \\x1b[2J" in shown and "\x1b" not in shown
    assert "[bold]Error[/bold]" in shown and "[/etc]" in shown
