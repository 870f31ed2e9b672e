"""Everything the CLI prints: rich for people, JSON for scripts, errors on stderr."""

from __future__ import annotations

import datetime as dt
import json
import sys
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape

from common.display import neutral

if TYPE_CHECKING:
    from google.protobuf.message import Message

out = Console(highlight=False, soft_wrap=True, emoji=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)


def plain(text: str) -> str:
    """``text`` for a rich print: its brackets are not markup (a path like ``[/x]``
    would raise MarkupError), its control and bidi characters escaped, its lines kept."""
    return escape("\n".join(neutral(line) for line in text.split("\n")))


def print_error(message: str) -> None:
    """One error on stderr, in the CLI's form: ``error: what is wrong; what to do``."""
    err.print(f"[red]error:[/red] {plain(message)}", markup=True)


def as_dict(msg: Message) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict  # only --json needs it

    return MessageToDict(
        msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def enum_name(value: str, prefix: str) -> str:
    return value.removeprefix(prefix).lower()


def ago(unix_nano: int) -> str:
    if not unix_nano:
        return "-"
    seconds = max(0, int(dt.datetime.now().timestamp() - unix_nano / 1e9))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


STATE_STYLE = {
    "ready": "green",
    "running": "green",
    "stopped": "yellow",
    "created": "yellow",
    "disconnected": "red",
    "error": "red",
    "unknown": "magenta",
    "connecting": "cyan",
    "starting": "cyan",
    "stopping": "cyan",
    "creating": "cyan",
    "destroying": "cyan",
}


def styled(state: str) -> str:
    style = STATE_STYLE.get(state)
    return f"[{style}]{state}[/{style}]" if style else state
