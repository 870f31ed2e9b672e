"""Reading and parsing a project config with bounds, wherever one is read.

A config path may name anything: ``/dev/zero`` (endless), a FIFO (blocks), a
directory, a 50 MB file, a binary, a YAML bomb nested 10,000 deep or a file
that is not ours at all (``/etc/shadow``). Each gets one line saying what is
wrong, before any unbounded work and without echoing the file's content.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from common.display import neutral, shown
from common.errors import ConfigError

# Far above any real project config (a few KiB), far below what hurts.
MAX_CONFIG_BYTES = 1024 * 1024
# Nesting and values after YAML aliases are expanded: real configs need ~5 and ~1,000.
MAX_DEPTH = 32
MAX_VALUES = 100_000
# Problems listed in one error; the rest are counted.
MAX_PROBLEMS = 20

_LIMIT_TEXT = f"{MAX_CONFIG_BYTES // 1024 // 1024} MiB"
_KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,62}$")
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~5x faster


def source_of(path: Path | str) -> str:
    """How a config's path appears in messages: escaped and cut short."""
    return shown(str(path), 200)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def read_config_text(path: Path) -> str:
    """The text of the config at ``path``: a regular file of at most
    MAX_CONFIG_BYTES of UTF-8, else ConfigError with one line saying why."""
    where = source_of(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; we refuse it below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(
            f"{where}: no such file; create one with `vendetta init` or pass --config"
        ) from None
    except PermissionError:
        raise ConfigError(f"{where}: permission denied; pass a config you can read") from None
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else type(exc).__name__
        raise ConfigError(f"{where}: cannot open it ({reason.lower()})") from None
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        hint = " (pass the config file in it)" if stat.S_ISDIR(st.st_mode) else ""
        raise ConfigError(f"{where}: is {_kind(st.st_mode)}, not a config file{hint}")
    if st.st_size > MAX_CONFIG_BYTES:
        os.close(fd)
        raise ConfigError(_too_big(where, st.st_size))
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(MAX_CONFIG_BYTES + 1)  # files in /proc say size 0; never trust it
        except OSError as exc:
            reason = os.strerror(exc.errno or errno.EIO).lower()
            raise ConfigError(f"{where}: cannot read it ({reason})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(_too_big(where, None))
    return decode_config(data, where)


def _too_big(where: str, size: int | None) -> str:
    what = f"{size} bytes" if size is not None else f"more than {MAX_CONFIG_BYTES} bytes"
    return (
        f"{where}: is {what}; a vendetta config may be at most {_LIMIT_TEXT} "
        "(is this the right file?)"
    )


def decode_config(data: bytes, where: str) -> str:
    if b"\0" in data:
        raise ConfigError(f"{where}: is a binary file, not a vendetta config")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{where}: is not UTF-8 text (a byte that is not UTF-8 at offset {exc.start}); "
            "save it as UTF-8"
        ) from None


def load_mapping(text: str, where: str, known_keys: set[str]) -> dict[str, Any]:
    """Parse ``text`` as a config's YAML: a mapping with at least one of
    ``known_keys``, bounded in size, depth and values; ConfigError otherwise."""
    if len(text) > MAX_CONFIG_BYTES or len(text.encode("utf-8", "replace")) > MAX_CONFIG_BYTES:
        raise ConfigError(_too_big(where, None))
    try:
        data = yaml.load(text, Loader=_Loader)  # a safe loader (C or Python)
    except RecursionError:
        raise ConfigError(f"{where}: is nested too deeply for a vendetta config") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML{_yaml_where(exc, text)}") from None
    if data is None:
        raise ConfigError(f"{where}: the file is empty; `vendetta init` writes a starter config")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{where}: is not a vendetta config: its top level must be a mapping "
            "(name:, provider:, ...)"
        )
    # Some other file (/etc/shadow): no key of ours and lines taken for keys.
    if not any(k in known_keys for k in data if isinstance(k, str)) and not all(
        _KEY_RE.fullmatch(str(k)) for k in data
    ):
        raise ConfigError(
            f"{where}: is not a vendetta config (none of its top-level keys is one of "
            f"{', '.join(sorted(known_keys))}); `vendetta init` writes a starter config"
        )
    _check_bounds(data, where)
    return data


def _yaml_where(exc: yaml.YAMLError, text: str) -> str:
    # Only the position and the parser's own words: YAMLError's text quotes the
    # file's lines, which may be anything (a password file).
    if isinstance(exc, yaml.reader.ReaderError) and isinstance(exc.position, int):
        pos = exc.position
        line, column = text.count("\n", 0, pos) + 1, pos - text.rfind("\n", 0, pos)
        code = exc.character if isinstance(exc.character, int) else ord(str(exc.character)[:1])
        return f" at line {line}, column {column}: character #x{code:04x} is not allowed in YAML"
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{at}: {shown(str(problem), 120)}" if problem else at


def _check_bounds(data: Any, where: str) -> None:
    """Depth and count of values, aliases expanded (a YAML alias may point to an
    ancestor, or fan out exponentially): iterative, so never a RecursionError."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    count = 0
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise ConfigError(
                f"{where}: has more than {MAX_VALUES} values (YAML aliases included); "
                "a vendetta config needs far fewer"
            )
        if depth > MAX_DEPTH:
            raise ConfigError(
                f"{where}: is nested deeper than {MAX_DEPTH} levels (or a YAML alias "
                "refers to its own ancestor); a vendetta config needs a few"
            )
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
            stack.extend((k, depth + 1) for k in value if isinstance(k, dict | list | tuple))
        elif isinstance(value, list | tuple):
            stack.extend((v, depth + 1) for v in value)


def _key(part: Any) -> str:
    # A key of the file is named only if it looks like one: never a line of
    # someone's file taken for a key.
    if isinstance(part, int):
        return str(part)
    text = str(part)
    return text if _KEY_RE.fullmatch(text) else "<a key that is not a name>"


def invalid(where: str, problems: list[str]) -> ConfigError:
    """One ConfigError listing at most MAX_PROBLEMS problems, each escaped."""
    lines = [f"  {shown(p, 300)}" for p in problems[:MAX_PROBLEMS]]
    if len(problems) > MAX_PROBLEMS:
        lines.append(f"  ... and {len(problems) - MAX_PROBLEMS} more problems")
    return ConfigError(f"{where}: invalid config:\n" + "\n".join(lines))


def validation_problems(exc: ValidationError) -> list[str]:
    """pydantic's errors as ``key.path: what is wrong``, values never shown."""
    problems = []
    for err in exc.errors(include_input=False, include_url=False):
        loc = ".".join(_key(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling against the docs)"
        problems.append(f"{loc}: {neutral(msg)}")
    return problems
