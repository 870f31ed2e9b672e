"""Typer without pydantic for plain text parameters (issue 16: startup).

Typer (0.2x) coerces every parameter through a pydantic TypeAdapter built on
first use, so any command line with an option paid for importing pydantic
(tens of ms, more than the RPC) to turn a str into the same str. Here a text
parameter given text is returned as it is, a path given as text is made a
Path before typer's own path checks, and a missing value stays None as typer's
own coerce() decides; anything else (numbers, enums, bytes...)
goes to typer's own coercion, built on first need, so messages and checks stay
typer's. With a typer that lacks this hook, install() does nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from typer import core as typer_core


def install() -> None:
    try:
        from typer._coercion import RuntimeParam
        from typer._param_types import coerce_cli_path
    except ImportError:  # another typer: leave it as it is
        return
    original: Any = getattr(typer_core, "build_runtime_param", None)
    if original is None or getattr(original, "_vendetta", False):
        return

    @dataclass(frozen=True)
    class Deferred(RuntimeParam):
        descriptor: Any = None
        real: list[Any] = field(default_factory=list)  # typer's own, once needed

        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            if (
                self.annotation is str
                and isinstance(value, str)
                and self.parameter_info.parser is None
            ):
                return value
            info = self.parameter_info
            if (
                self.annotation is Path
                and info.path_type is None
                and isinstance(value, str)
                and value
            ):
                return coerce_cli_path(Path(value), info, path_type=Path, param=param, ctx=ctx)
            if not self.real:
                self.real.append(original(self.descriptor))
            return self.real[0]._coerce_value(value, param=param, ctx=ctx)

    def build(descriptor: Any) -> Any:
        if getattr(descriptor, "file_annotation", None) is not None:
            return original(descriptor)
        return Deferred(
            annotation=descriptor.annotation,
            parameter_info=descriptor.parameter_info,
            descriptor=descriptor,
        )

    build._vendetta = True  # type: ignore[attr-defined]
    setattr(typer_core, "build_runtime_param", build)  # noqa: B010 (not in typer's exports)
