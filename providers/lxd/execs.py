"""Non-interactive exec in LXD containers: streamed (``open_exec``) or recorded
(``run_recorded``), on our own sockets instead of pylxd's ``execute``.

pylxd's ``Instance.execute`` reads the output through ws4py's shared poller,
which under a few concurrent execs (health checks, log tails, exit watchers)
failed about one exec in a hundred with ``BrokenPipeError`` or "I/O operation
on closed epoll object". Here each exec has sockets of its own (see
``websocket``): ``POST /1.0/instances/NAME/exec`` with ``wait-for-websocket``
and ``interactive: false`` answers with four secrets, ``0`` (stdin), ``1``
(stdout), ``2`` (stderr) and ``control``. LXD starts the command once the
three data websockets are connected. Closing the stdin websocket gives the
command end-of-file there; LXD closes stdout and stderr when the command's
end of them closes, and the operation's result carries the exit code.

``open_exec`` blocks (the provider runs it in a thread); :class:`LxdPipe`
reads the output in daemon threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pylxd.exceptions

from common.errors import FailedPreconditionError
from providers.base import ExecChunk, Terminal
from providers.lxd.source import Inside
from providers.lxd.terminal import exit_code, operation_id
from providers.lxd.websocket import THREAD_PREFIX, WebSocket
from providers.threaded import ThreadedStream, ThreadedWriter, merge

# No workdir or user of a source: LXD's defaults (root, in /root).
NOWHERE = Inside()


@dataclass
class Exec:
    operation: str
    stdin: WebSocket
    stdout: WebSocket
    stderr: WebSocket
    control: WebSocket

    def kill(self) -> None:
        """KILL the wrapper if it still runs, then close every socket; idempotent.

        The command itself reads end-of-file on stdin; it may run on (LXD lets a
        signal reach only the process it started), as with pylxd before.
        """
        with contextlib.suppress(OSError):
            self.control.send_text(json.dumps({"command": "signal", "signal": int(signal.SIGKILL)}))
        self.close()

    def close(self) -> None:
        for ws in (self.control, self.stdin, self.stdout, self.stderr):
            ws.close()


# LXD 5.0 closes an exec's output websockets as soon as the command it started
# exits, dropping what is still on its way: about 1 in 20 commands that print and
# exit at once lost their output while other execs ran. This wrapper (the command
# LXD starts) lets the output drain before it exits with the command's status.
# `env` runs the program itself, never a shell builtin of the same name; in the
# foreground, so it keeps its stdin and the default signal dispositions.
DRAIN_WRAPPER = """
env "$@"
s=$?
sleep 0.2 2>/dev/null
exit "$s"
"""


def open_exec(
    client: Any,
    instance: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: str | None,
    inside: Inside = NOWHERE,
) -> Exec:
    """Start ``argv`` in ``instance`` (under ``DRAIN_WRAPPER``), its stdin, stdout
    and stderr on websockets; in ``cwd``, else where ``inside`` says, as its user."""
    body: dict[str, Any] = {
        "command": ["sh", "-c", DRAIN_WRAPPER, "vendetta-exec", *argv],
        "environment": dict(env),
        "wait-for-websocket": True,
        "interactive": False,
    }
    body |= inside.exec_fields(cwd, env)
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
    return Exec(operation, stdin, stdout, stderr, control)


class LxdPipe(Terminal):
    """A command on pipes: stdin written here, stdout and stderr read apart.

    Leaving early (``close`` before the output ended) kills the wrapper (see ``kill``), as
    nobody reads its output any more.
    """

    def __init__(
        self,
        client: Any,
        ex: Exec,
        name: str,
        on_error: Callable[[BaseException], Exception],
    ) -> None:
        self._client = client
        self._ex = ex
        self._name = name
        self._on_error = on_error
        self._ended = False
        self._streams: list[ThreadedStream[bytes]] = []
        self._stdin = ThreadedWriter(
            f"{THREAD_PREFIX}stdin-{name}", ex.stdin.send_binary, ex.stdin.close
        )

    async def output(self) -> AsyncIterator[ExecChunk]:
        def reader(kind: str, ws: WebSocket) -> ThreadedStream[bytes]:
            stream: ThreadedStream[bytes] = ThreadedStream(
                f"{THREAD_PREFIX}exec-{kind}-{self._name}",
                lambda: (ws.messages(), ws.close),
                self._on_error,
            )
            self._streams.append(stream)
            return stream

        merged = merge(
            {
                "stdout": reader("stdout", self._ex.stdout),
                "stderr": reader("stderr", self._ex.stderr),
            }
        )
        try:
            async for kind, data in merged:
                yield ExecChunk(stdout=data) if kind == "stdout" else ExecChunk(stderr=data)
        finally:
            await merged.aclose()
        try:
            code = await asyncio.to_thread(exit_code, self._client, self._ex.operation)
        except Exception as exc:
            raise self._on_error(exc) from exc
        self._ended = True
        yield ExecChunk(exit_code=code)

    async def write(self, data: bytes) -> None:
        await self._stdin.write(data)

    async def close_stdin(self) -> None:
        self._stdin.close()  # the websocket closes once what is queued went out

    async def resize(self, rows: int, cols: int) -> None:
        pass  # no terminal

    async def close(self) -> None:
        self._stdin.close()
        if self._ended:
            self._ex.close()
        else:
            self._ex.kill()  # small messages on local sockets: they do not block
        for stream in self._streams:
            await stream.aclose()


# How long a recorded run may go on once nobody waits for it, for its output files to be removed.
ABANDONED_WAIT = 600.0


def run_recorded(
    client: Any,
    instance: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: str | None,
    abandoned: Callable[[], bool],
    inside: Inside = NOWHERE,
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
    body |= inside.exec_fields(cwd, env)
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
