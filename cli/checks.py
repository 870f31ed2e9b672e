"""Checks of the CLI's arguments before any call: names, ports, counts, seconds.

Typer parses ``--port 99999999999999999999`` into a Python int and ``--grace nan``
into a float; protobuf then refuses them with a traceback, or the coordinator
takes them. Each check here turns a bad value into one line and exit code 2,
as typer does for what it cannot parse.
"""

from __future__ import annotations

import math
import shlex
from typing import NoReturn

import typer

from cli.output import print_error
from common.display import shown
from common.errors import InvalidArgumentError
from common.names import validate_name

EXIT_USAGE = 2
INT32_MAX = 2**31 - 1
MAX_GRACE = 86400.0  # the coordinator's limit for a node's grace period (a day)
# common.config's PROVIDERS and their aliases (not imported: pydantic only where needed).
PROVIDER_NAMES = ("docker", "lxd", "qemu", "lxc", "kvm")


def usage_error(message: str) -> NoReturn:
    print_error(message)
    raise typer.Exit(EXIT_USAGE)


def _name(kind: str, value: str) -> str:
    try:
        return validate_name(kind, value)
    except InvalidArgumentError as exc:
        usage_error(str(exc))


def workspace_name(value: str) -> str:
    return _name("workspace", value)


def node_name(value: str) -> str:
    return _name("node", value)


def node_filter(value: str) -> str:
    """A node option where empty means every node."""
    return _name("node", value) if value else value


def service_name(value: str) -> str:
    """A service option where empty means every service."""
    return _name("service", value) if value else value


def optional_node_name(value: str | None) -> str | None:
    """A node option where absent means "the default" but an empty value is a mistake."""
    if value is None:
        return None
    if not value.strip():
        usage_error(
            "an empty node name: name a node (`vendetta node list`) or leave the option out"
        )
    return _name("node", value)


def provider(value: str) -> str:
    """A provider option where empty means the default."""
    if value and value not in PROVIDER_NAMES:
        usage_error(f"unknown provider '{shown(value)}': use docker, lxd (lxc) or qemu (kvm)")
    return value


def command_line(value: str) -> str:
    """A command given as one string (``--agent-command``), split as a shell would."""
    try:
        shlex.split(value)
    except ValueError as exc:
        usage_error(f"cannot split the command '{shown(value)}': {str(exc).lower()}")
    return value


def port(value: int) -> int:
    if not 1 <= value <= 65535:
        usage_error(f"port {value} is not a TCP port: use 1-65535")
    return value


def tail(value: int) -> int:
    if not 0 <= value <= INT32_MAX:
        usage_error(f"--tail {value}: use 0 (all lines) or a number of lines up to {INT32_MAX}")
    return value


def grace(value: float) -> float:
    """``node add --grace``: seconds, 0 for the coordinator's default."""
    if not math.isfinite(value) or not 0 <= value <= MAX_GRACE:
        usage_error(
            f"--grace {value:g}: use seconds between 0 (the coordinator's default) and "
            f"{MAX_GRACE:g}"
        )
    return value


def node_grace(value: float | None) -> float | None:
    """``server start --node-grace``: seconds, more than 0."""
    if value is not None and (not math.isfinite(value) or not 0 < value <= MAX_GRACE):
        usage_error(f"--node-grace {value:g}: use seconds above 0, up to {MAX_GRACE:g}")
    return value
