"""How `vendetta node test` prints its rows: a table, then what to do for each failure."""

from __future__ import annotations

import typer
from rich.markup import escape
from rich.table import Table

from cli.output import as_dict, out, print_json
from vendetta.v1 import coordinator_pb2 as pb


def _result(c: pb.NodeCheck) -> str:
    if c.skipped:
        return "[dim]skipped[/dim]"
    return "[green]ok[/green]" if c.ok else "[red]FAIL[/red]"


def _label(c: pb.NodeCheck) -> str:
    return escape(f"{c.provider} {c.name}" if c.provider else c.name)


def show(r: pb.TestNodeResponse, json_: bool) -> None:
    """Print the rows (or JSON); exit 1 when a check failed."""
    if json_:
        print_json(as_dict(r))
    else:
        table = Table("CHECK", "RESULT", "VALUE", title=f"node {r.node.name}")
        for c in r.checks:
            table.add_row(_label(c), _result(c), escape(c.value))
        out.print(table)
        failed = [c for c in r.checks if not c.ok and not c.skipped]
        for c in failed:
            out.print(f"[red]{_label(c)}[/red]: {escape(c.fix)}")
        if not failed:
            out.print(f"node {r.node.name}: all checks passed")
    if not r.ok:
        raise typer.Exit(1)
