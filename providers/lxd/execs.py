"""Non-interactive exec in LXD containers: streamed (``open_exec``) or recorded
(``run_recorded``), on our own sockets instead of pylxd's ``execute``.

pylxd's ``Instance.execute`` reads the output through ws4py's shared poller,
which under a few concurrent execs (health checks, log tails, exit watchers)
failed about one exec in a hundred with ``BrokenPipeError`` or "I/O operation
on closed epoll object". Here each exec has sockets of its own (see
``websocket``): ``POST /1.0/instances/NAME/exec`` with ``wait-for-websocket``
and ``interactive: false`` answers with four secrets, ``0`` (stdin), ``1``
(stdout), ``2`` (stderr) and ``control``. LXD starts the command once the
three data websockets are connected. We close stdin at once, so the command
reads end-of-file there, as with ``docker exec`` without ``-i``; LXD closes
stdout and stderr when the command's end of them closes, and the operation's
result carries the exit code.

Every call here blocks: the provider runs them in threads.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pylxd.exceptions

from common.errors import FailedPreconditionError
from providers.lxd.terminal import operation_id
from providers.lxd.websocket import WebSocket


@dataclass
class Exec:
    operation: str
    stdout: WebSocket
    stderr: WebSocket
    control: WebSocket

    def kill(self) -> None:
        """SIGKILL the command if it still runs, then close every socket; idempotent."""
        with contextlib.suppress(OSError):
            self.control.send_text(json.dumps({"command": "signal", "signal": int(signal.SIGKILL)}))
        for ws in (self.control, self.stdout, self.stderr):
            ws.close()

    def close(self) -> None:
        for ws in (self.control, self.stdout, self.stderr):
            ws.close()


def open_exec(
    client: Any,
    instance: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: str | None,
) -> Exec:
    """Start ``argv`` in ``instance`` with stdin at end-of-file; its output sockets."""
    body: dict[str, Any] = {
        "command": list(argv),
        "environment": dict(env),
        "wait-for-websocket": True,
        "interactive": False,
    }
    if cwd:
        body["cwd"] = cwd
    response = client.api.instances[instance].exec.post(json=body).json()
    operation = str(response["operation"])
    fds = response["metadata"]["metadata"]["fds"]
    resource = f"/1.0/operations/{operation_id(operation)}/websocket?secret="
    opened: list[WebSocket] = []
    try:
        for fd in ("control", "0", "1", "2"):
            opened.append(WebSocket.connect(client.websocket_url, resource + str(fds[fd])))
    except BaseException:
        for ws in opened:
            ws.close()
        raise
    control, stdin, stdout, stderr = opened
    stdin.close()
    return Exec(operation, stdout, stderr, control)


# How long a recorded run may go on once nobody waits for it, for its output files to be removed.
ABANDONED_WAIT = 600.0


def run_recorded(
    client: Any,
    instance: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: str | None,
    abandoned: Callable[[], bool],
) -> tuple[int, bytes, bytes]:
    """Run ``argv`` to completion with LXD recording its output: (exit code, stdout, stderr).

    No websocket: LXD 5.0 loses the output of a command that exits at once while
    other execs run (about 1 in 20 at six at a time, seen here with pylxd and
    with ``open_exec`` alike), because it closes the streams before they are
    drained. With ``record-output`` it writes the output to files of the
    instance's log folder, which we read and then remove. stdin is /dev/null.
    ``abandoned()`` true: nobody waits for the result any more; the files are
    still removed once the command ends (if within ``ABANDONED_WAIT``).
    """
    body: dict[str, Any] = {
        "command": list(argv),
        "environment": dict(env),
        "wait-for-websocket": False,
        "interactive": False,
        "record-output": True,
    }
    if cwd:
        body["cwd"] = cwd
    response = client.api.instances[instance].exec.post(json=body).json()
    node = client.api.operations[operation_id(str(response["operation"]))]
    gave_up_at: float | None = None
    while True:
        meta = node.wait.get(params={"timeout": 30}).json()["metadata"]
        if meta.get("status") != "Running":
            break
        if abandoned():
            gave_up_at = gave_up_at or time.monotonic()
            if time.monotonic() - gave_up_at > ABANDONED_WAIT:
                return -1, b"", b""
    result = meta.get("metadata") or {}
    if meta.get("status") != "Success" and "return" not in result:
        raise FailedPreconditionError(f"LXD could not run the command: {meta.get('err') or meta}")
    outputs: dict[str, bytes] = {}
    for fd, path in (result.get("output") or {}).items():
        file = client.api
        for part in str(path).removeprefix("/1.0/").split("/"):
            file = file[part]
        try:
            outputs[str(fd)] = file.get(is_api=False).content
        finally:
            with contextlib.suppress(pylxd.exceptions.LXDAPIException):
                file.delete()
    code = result.get("return")
    return (
        (int(code) if isinstance(code, int) else -1),
        outputs.get("1", b""),
        outputs.get("2", b""),
    )
