"""Nouns loaded on use: `vendetta X ...` imports X's module only (issue 16).

Importing every noun (and with them grpc, the generated stubs, pydantic, rich's
tables, the coordinator's daemon code) cost a command more than its RPC. The
root group holds a placeholder per noun, with the help line `vendetta --help`
shows; the real command replaces it the first time a command line names it.
tests/unit/test_cli_import_budget.py checks that each placeholder's help is its
module's own, and what `--help` imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Any

import typer
from typer.core import TyperGroup

from cli import fast_params

fast_params.install()  # text options without importing pydantic (see there)


@dataclass(frozen=True)
class Lazy:
    """Where a root command lives: ``module.attr``, a Typer app or a command function."""

    name: str
    module: str
    attr: str
    help: str
    hidden: bool = False
    # Commands of this app defined in other modules: (name, module, attr).
    extra: tuple[tuple[str, str, str], ...] = ()


NOUNS: list[Lazy] = []  # filled by cli/main.py, in the order help lists them


def load(entry: Lazy) -> Any:
    """The real click command for ``entry`` (importing its module), built as the root's
    add_typer/command would have built it."""
    obj = getattr(import_module(entry.module), entry.attr)
    root = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    if isinstance(obj, typer.Typer):
        for name, module, attr in entry.extra:
            if all(c.name != name for c in obj.registered_commands):
                obj.command(name)(getattr(import_module(module), attr))
        root.add_typer(obj, name=entry.name)
    else:
        root.command(entry.name, hidden=entry.hidden)(obj)
    return typer.main.get_group(root).commands[entry.name]


class LazyGroup(TyperGroup):
    """The root group: placeholders for listing, the real command once one is named."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._lazy = {e.name: e for e in NOUNS}
        self._listing = False
        for e in NOUNS:
            self.commands.setdefault(
                e.name, typer.core.TyperCommand(e.name, help=e.help, hidden=e.hidden)
            )

    def format_help(self, ctx: Any, formatter: Any) -> None:
        self._listing = True  # the listing reads placeholders' help lines, imports nothing
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        entry = self._lazy.get(cmd_name)
        if entry is not None and not self._listing:
            self.commands[cmd_name] = load(entry)
            del self._lazy[cmd_name]
        return super().get_command(ctx, cmd_name)
