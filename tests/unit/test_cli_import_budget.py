"""What a command line imports (issue 16): every command pays only for what it uses.

Each case runs the real `vendetta` entry point in a fresh interpreter and lists
sys.modules afterwards; a budget is a list of modules that must not be there,
never a time. Typer renders --help with rich, so rich itself is allowed there.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import cli.main  # noqa: F401 (registers the root's nouns in NOUNS)
from cli.lazy import NOUNS, Lazy, load

PROBE = """
import json, sys
sys.argv = ["vendetta", *json.loads(sys.argv[1])]
from cli.main import main
try:
    main()
except SystemExit:
    pass
print("\\n" + json.dumps(sorted(sys.modules)))
"""

# Heavy or unrelated to any listing/help: never imported by these command lines.
NEVER = ["pydantic", "yaml", "docker", "asyncssh", "coordinator", "nodeagent", "providers"]
OTHER_NOUNS = ["cli.node", "cli.image", "cli.server", "cli.token", "cli.cluster"]


def imported(tmp_path: Path, *args: str) -> set[str]:
    env = {"VENDETTA_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin", "COLUMNS": "100"}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(list(args))],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    return set(json.loads(proc.stdout.rsplit("\n", 2)[-2]))


def offenders(modules: set[str], forbidden: list[str]) -> list[str]:
    return sorted(m for m in modules if any(m == f or m.startswith(f + ".") for f in forbidden))


def test_root_help_imports_no_noun_and_no_rpc_stack(tmp_path: Path) -> None:
    mods = imported(tmp_path, "--help")
    assert "cli.main" in mods  # the probe really ran the CLI
    nouns = ["cli.workspace", "cli.client", "cli.ssh_config", "cli.project", *OTHER_NOUNS]
    assert offenders(mods, [*NEVER, "grpc", "google.protobuf", "vendetta", *nouns]) == []


def test_version_imports_no_rich(tmp_path: Path) -> None:
    mods = imported(tmp_path, "--version")
    assert offenders(mods, [*NEVER, "grpc", "vendetta", "rich"]) == []


@pytest.mark.parametrize(
    "args",
    [
        ("workspace", "list", "--help"),
        ("workspace", "list"),  # no coordinator here: it fails after parsing, as a user's would
        ("workspace", "status", "w1"),
    ],
)
def test_workspace_commands_import_only_their_noun(tmp_path: Path, args: tuple[str, ...]) -> None:
    mods = imported(tmp_path, *args)
    assert "cli.workspace" in mods
    # JSON conversion is for --json; common.remote (TLS pinning) for VENDETTA_URL only.
    only_when_asked = ["google.protobuf.json_format", "common.remote"]
    assert offenders(mods, [*NEVER, *OTHER_NOUNS, *only_when_asked]) == []


def test_node_list_imports_no_workspace_module(tmp_path: Path) -> None:
    mods = imported(tmp_path, "node", "list")
    assert "cli.node" in mods
    assert offenders(mods, [*NEVER, "cli.workspace", "cli.image", "cli.token"]) == []


@pytest.mark.parametrize("entry", NOUNS, ids=[e.name for e in NOUNS])
def test_placeholder_help_is_the_modules_own(entry: Lazy) -> None:
    """`vendetta --help` lists placeholders: their help lines must be the real ones."""
    cmd = load(entry)
    assert cmd.name == entry.name
    assert cmd.hidden == entry.hidden
    if not entry.hidden:
        assert (cmd.help or "").split("\n\n")[0].strip() == entry.help
