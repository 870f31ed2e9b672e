"""The argument checks of the provider contract, made once for every engine."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from common.errors import InvalidArgumentError
from common.names import validate_name

if TYPE_CHECKING:
    from providers.base import EnvironmentSpec


def check_env(env: Mapping[str, str]) -> None:
    """Variable names an exec or terminal may set (no '=', no NUL, not empty)."""
    for key in env:
        if not key or "=" in key or "\0" in key:
            raise InvalidArgumentError(f"invalid environment variable name {key!r}")


def check_command(what: str, argv: Sequence[str], env: Mapping[str, str] | None) -> None:
    if not argv:
        raise InvalidArgumentError(f"{what} needs a command: argv is empty")
    check_env(env or {})


def check_spec(provider: str, spec: EnvironmentSpec) -> None:
    validate_name("workspace", spec.workspace)
    if not spec.image:
        raise InvalidArgumentError(
            f"workspace {spec.workspace!r} has no image: set {provider}.image in "
            ".vendetta/config.yaml"
        )
    if spec.cpus is not None and spec.cpus <= 0:
        raise InvalidArgumentError(f"cpus must be positive, got {spec.cpus}")
    if spec.memory_bytes is not None and spec.memory_bytes <= 0:
        raise InvalidArgumentError(f"memory must be positive, got {spec.memory_bytes} bytes")
    if spec.disk_bytes is not None and spec.disk_bytes <= 0:
        raise InvalidArgumentError(f"disk must be positive, got {spec.disk_bytes} bytes")
    if spec.command is not None and not spec.command:
        raise InvalidArgumentError("command must not be empty (leave it unset to idle)")
    check_env(spec.env)
    for port in spec.ports:
        if not 1 <= port <= 65535:
            raise InvalidArgumentError(f"port {port} is not a TCP port (1-65535)")
