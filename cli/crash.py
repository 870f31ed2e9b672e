"""The CLI's last resort: an exception nobody expected becomes one line saying it
is a bug and where its traceback was written, instead of a traceback on screen."""

from __future__ import annotations

import datetime as dt
import os
import tempfile
import traceback
from pathlib import Path

from cli.output import print_error
from common.display import shown
from common.paths import private_dir, vendetta_home

EXIT_BUG = 70  # EX_SOFTWARE: an internal error


def _write(text: str) -> Path | None:
    """Append ``text`` to VENDETTA_HOME/cli-errors.log (0600), else a new temp file."""
    try:
        path = private_dir(vendetta_home()) / "cli-errors.log"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    except OSError:
        try:
            fd, name = tempfile.mkstemp(prefix="vendetta-error-", suffix=".log")
        except OSError:
            return None
        path = Path(name)
    with os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace") as f:
        f.write(text)
    return path


def report(exc: BaseException) -> int:
    """Log ``exc``'s traceback, say so in one line; the exit code to use."""
    stamp = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    trace = "".join(traceback.format_exception(exc))
    path = _write(f"--- {stamp} pid {os.getpid()}\n{trace}\n")
    where = f"the details are in {path}" if path else "no file could be written for details"
    print_error(
        f"unexpected {type(exc).__name__}: {shown(str(exc), 120)} - a bug in vendetta; "
        f"{where} (please include them in a report)"
    )
    return EXIT_BUG
