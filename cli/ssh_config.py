"""`vendetta ssh-config`: `ssh NAME.vendetta` from any SSH client.

The coordinator keeps one file of `Host NAME.vendetta` entries current; this
command adds the single `Include` line for it to ~/.ssh/config (with consent,
`--dry-run` shows the diff), or takes it out again with `--remove`.
"""

from __future__ import annotations

import difflib
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from cli.client import coordinator
from cli.output import err, out, print_json
from cli.runner import fail, run
from common.errors import FailedPreconditionError, InvalidArgumentError
from common.paths import ssh_entries, vendetta_home
from common.ssh_hosts import SUFFIX, quoted
from vendetta.v1 import coordinator_pb2 as pb

DEFAULT_FILE = Path("~/.ssh/config")
MARK = "# Added by `vendetta ssh-config`: `ssh NAME.vendetta` reaches workspaces."


def include_line(entries: Path) -> str:
    return f"Include {quoted(entries)}"


def has_line(text: str, line: str) -> bool:
    return any(ln.strip() == line for ln in text.splitlines())


def included(file: Path = DEFAULT_FILE) -> bool:
    """Whether the user's SSH config includes our entries (so `ssh NAME.vendetta` works)."""
    try:
        text = file.expanduser().read_text()
    except OSError:
        return False
    return has_line(text, include_line(ssh_entries(vendetta_home())))


def with_include(text: str, line: str) -> str:
    # At the top: an Include after a Host block would only apply inside that block.
    return f"{MARK}\n{line}\n\n{text}" if text else f"{MARK}\n{line}\n"


def without_include(text: str, line: str) -> str:
    lines = text.splitlines(keepends=True)
    kept = [ln for ln in lines if ln.strip() not in (MARK, line)]
    # The blank line we added after our two.
    if len(kept) < len(lines) and kept and kept[0].strip() == "" and lines[0].strip() == MARK:
        kept = kept[1:]
    return "".join(kept)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o600
    tmp = path.with_name(f".{path.name}.vendetta-tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def ssh_config(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show the change to the file; change nothing.")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Change it without asking.")] = False,
    remove: Annotated[bool, typer.Option("--remove", help="Take the Include line out.")] = False,
    file: Annotated[Path, typer.Option("--file", help="Your SSH client configuration.")] = Path(
        "~/.ssh/config"
    ),
    json_: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Let `ssh NAME.vendetta` reach workspaces: include vendetta's entries in ~/.ssh/config."""

    async def names() -> list[str]:
        async with coordinator() as c:
            resp = await c.ListWorkspaces(pb.ListWorkspacesRequest())
            return [w.name for w in resp.workspaces]

    workspaces = run(names())
    entries = ssh_entries(vendetta_home())
    if not entries.is_file():
        fail(
            FailedPreconditionError(
                f"the coordinator has not written {entries}: restart it with "
                "`vendetta server stop && vendetta server start`"
            )
        )
    target = file.expanduser()
    if target.is_dir():
        fail(InvalidArgumentError(f"{target} is a folder, not an SSH config file"))
    before = target.read_text() if target.exists() else ""
    line = include_line(entries)
    present = has_line(before, line)
    if remove:
        after = without_include(before, line) if present else before
    else:
        after = before if present else with_include(before, line)
    changed = after != before
    diff = "".join(
        difflib.unified_diff(
            before.splitlines(keepends=True),
            after.splitlines(keepends=True),
            f"{target} (now)",
            f"{target} (after)",
        )
    )
    hosts = [f"{n}{SUFFIX}" for n in sorted(workspaces)]

    if changed and not dry_run:
        if not yes:
            if not sys.stdin.isatty():
                fail(
                    InvalidArgumentError(
                        f"cannot ask before changing {target} (no terminal): check the change "
                        "with `vendetta ssh-config --dry-run`, then pass --yes"
                    )
                )
            err.print(diff, markup=False, highlight=False, end="")
            if not typer.confirm(f"Change {target}?"):
                raise typer.Exit(1)
        _write(target, after)

    if json_:
        print_json(
            {
                "ssh_config": str(target),
                "entries": str(entries),
                "included": has_line(before if dry_run else after, line),
                "changed": changed and not dry_run,
                "diff": diff,
                "hosts": hosts,
            }
        )
        return
    if dry_run:
        if changed:
            out.print(diff, markup=False, highlight=False, end="")
        else:
            out.print(f"{target} needs no change.")
        return
    if remove:
        verb = "removed from" if changed else "was not in"
        out.print(f"The Include of {entries} {verb} {target}.")
        return
    out.print(
        f"{target} {'now includes' if changed else 'already includes'} {entries}, "
        "which the coordinator keeps current."
    )
    if hosts:
        out.print("Reach a workspace with: " + ", ".join(f"ssh {h}" for h in hosts))
    else:
        out.print("No workspaces yet: each one you create becomes `ssh NAME.vendetta`.")


def ssh_proxy(name: Annotated[str, typer.Argument(help="The workspace.")]) -> None:
    """ProxyCommand of the `Host NAME.vendetta` entries (speaks SSH on stdin/stdout)."""
    from common import liboqs

    liboqs.skip_absent_search()  # before asyncssh is imported: see common/liboqs.py
    from cli.ssh_proxy import serve

    run(serve(name))
