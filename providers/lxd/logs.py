"""What ``logs`` reads for an LXD environment, and how it follows it.

Two sources, both read through the LXD API (so they work while stopped too):

* the supervised command's log inside the container (``command.COMMAND_LOG``,
  read with the files API): stdout/stderr lines with their own timestamps;
* the console: what PID 1 (init) and anything writing to /dev/console or
  ``/proc/1/fd/1`` printed, from LXD's console buffer (``GET .../console``).
  The console has no timestamps: its lines get the time the agent saw them,
  and the stream name ``console``.

Following polls both every ``poll_interval`` and passes on what is new; LXD
has no push API for either. The reader keeps how much of each it has passed
on, and starts over when a source shrinks (the environment restarted).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import pylxd.exceptions

from common.errors import NotFoundError
from providers.base import LogRecord
from providers.lxd.command import COMMAND_LOG, CommandLogParser
from providers.lxd.errors import lxd_errors


@dataclass(frozen=True)
class Batch:
    records: list[LogRecord]
    running: bool


@dataclass
class LogReader:
    """Reads one instance's logs; each ``read`` returns only what is new. Blocking."""

    name: str
    where: str  # the LXD daemon, for error messages
    poll_interval: float = 0.25
    _parser: CommandLogParser = field(default_factory=CommandLogParser)
    _command_offset: int = 0
    _console_offset: int = 0

    def _command_log(self, client: Any) -> bytes:
        try:
            response = client.api.instances[self.name].files.get(params={"path": COMMAND_LOG})
        except pylxd.exceptions.NotFound:
            return b""  # no command, or not started yet
        return bytes(response.content)

    def _console(self, client: Any) -> str:
        try:
            with lxd_errors(self.where, f"reading the console of {self.name!r}"):
                response = client.api.instances[self.name].console.get()
        except NotFoundError:
            # LXD 5.0 answers "open : no such file or directory" while the console
            # buffer of a running container is still empty.
            return ""
        return str(response.text)

    def read(self, client: Any) -> Batch:
        status = client.api.instances[self.name].state.get().json()["metadata"]["status"]
        running = status == "Running"
        records: list[LogRecord] = []

        data = self._command_log(client)
        if len(data) < self._command_offset:  # recreated: start over
            self._command_offset = 0
            self._parser = CommandLogParser()
        end = data.rfind(b"\n") + 1  # complete lines only
        if end > self._command_offset:
            chunk = data[self._command_offset : end].decode("utf-8", "replace")
            self._command_offset = end
            for line in chunk.splitlines():
                record = self._parser.parse(line)
                if record is not None:
                    records.append(record)
        records.sort(key=lambda r: r.time_unix_nano)  # the two streams are written apart

        # A stopped container's console is LXD's saved log of the last run, not the
        # buffer we were following: only read it while running, or on a first read.
        if running or self._console_offset == 0:
            console = self._console(client).replace("\r\n", "\n")
            if len(console) < self._console_offset:  # restarted: a new buffer
                self._console_offset = 0
            end = console.rfind("\n") + 1
            if end > self._console_offset:
                now = time.time_ns()
                for line in console[self._console_offset : end].splitlines():
                    records.append(LogRecord(now, "console", line))
                self._console_offset = end
        return Batch(records, running)
