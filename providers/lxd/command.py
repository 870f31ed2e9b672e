"""The supervised command of an LXD environment, and the log it writes inside.

An LXD system container runs the image's init as PID 1, so ``spec.command``
cannot be the container's main process (as it is on Docker). The agent starts
it instead, each time the environment starts, through one exec of
:data:`SUPERVISOR` (POSIX sh: works with busybox and any distribution). The
supervisor runs the command detached from the exec, and appends each line the
command writes to :data:`COMMAND_LOG`, labelled with its stream and stamped::

    T <epoch seconds> <uptime>     once per start: maps uptime to wall time
    O <uptime> <text>              a line of stdout
    E <uptime> <text>              a line of stderr
    X <uptime> <exit code>         the command ended

``/proc/uptime`` is read by the shell builtin ``read`` (no process per line)
and has centisecond resolution; the epoch of a start comes from ``date +%s``.
So line times are exact relative to each other and within a second absolutely.
The log lives in the container, so it survives agent restarts and can be read
while the environment is stopped.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from providers.base import LogRecord

COMMAND_LOG = "/var/log/vendetta/command.log"

# $1: the log file; the rest: the command (argv, no shell interprets it).
SUPERVISOR = r"""
log=$1; shift
mkdir -p "${log%/*}"
read up _ </proc/uptime
echo "T $(date +%s) $up" >>"$log"
stamp() {
    while IFS= read -r line || [ -n "$line" ]; do
        read up _ </proc/uptime
        printf '%s %s %s\n' "$1" "$up" "$line"
    done >>"$log"
}
{
    {
        "$@" </dev/null 2>&1 1>&3 3>&- 4>&-
        code=$?
        read up _ </proc/uptime
        echo "X $up $code" >&4
    } | stamp E
} 3>&1 4>>"$log" | stamp O
"""

# Starts SUPERVISOR in the background and returns at once: its stdio are not the
# exec's, so LXD ends the exec as soon as this shell exits. LXD kills what is left
# of an exec's process group when it ends (nohup is not enough): setsid escapes it.
LAUNCHER = 'setsid sh -c "$0" vendetta-command "$@" </dev/null >/dev/null 2>&1 &'


def launch_argv(command: list[str]) -> list[str]:
    """The exec argv that starts ``command`` under the supervisor."""
    return ["sh", "-c", LAUNCHER, SUPERVISOR, COMMAND_LOG, *command]


@dataclass
class CommandLogParser:
    """Turns lines of :data:`COMMAND_LOG` into records (keeps the current start's clock)."""

    epoch: float = 0.0
    uptime0: float = 0.0

    def _time(self, uptime: str) -> int:
        try:
            offset = round((float(uptime) - self.uptime0) * 100) * 10_000_000  # centiseconds
        except ValueError:
            offset = 0
        return max(1, round(self.epoch) * 1_000_000_000 + offset)

    def parse(self, line: str) -> LogRecord | None:
        kind, _, rest = line.partition(" ")
        if kind == "T":
            epoch, _, uptime = rest.partition(" ")
            with contextlib.suppress(ValueError):
                self.epoch, self.uptime0 = float(epoch), float(uptime)
            return None
        uptime, _, text = rest.partition(" ")
        if kind == "O":
            return LogRecord(self._time(uptime), "stdout", text)
        if kind == "E":
            return LogRecord(self._time(uptime), "stderr", text)
        if kind == "X":
            return LogRecord(self._time(uptime), "console", f"command exited with code {text}")
        return None
