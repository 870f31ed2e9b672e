"""Interactive terminals in LXD containers: an interactive exec over two websockets.

``POST /1.0/instances/NAME/exec`` with ``interactive`` and
``wait-for-websocket`` answers with a background operation and two secrets:
fd ``0``, one websocket that carries the PTY both ways (binary messages), and
``control``, which takes JSON text messages (``window-resize``, ``signal``).
LXD starts the command once both are connected, on a PTY of the size given.
When the command ends LXD sends the rest of its output and an empty message
(end of output), closes the control websocket, and waits for us to close the
data websocket before it finishes the operation, whose result carries the
exit code (``metadata.return``).

Every call here blocks: :func:`open_terminal` and the methods of
:class:`LxdTerminal` run them in threads (one reader thread for the output).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import pylxd.exceptions

from providers.base import ExecChunk, Terminal
from providers.lxd.source import Inside
from providers.lxd.websocket import THREAD_PREFIX, WebSocket
from providers.threaded import ThreadedStream, ThreadedWriter

# How long to wait for LXD to record the exit code once the output has ended.
EXIT_WAIT = 30.0


def operation_id(operation: str) -> str:
    return operation.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]


# As execs.DRAIN_WRAPPER, for terminals: LXD 5.0 drops the last output of a command
# that exits at once while other execs run (`ssh -t NAME cmd` lost its last line, 1
# in 30 measured). The wrapper shares the terminal's process group, so ^C and ^\
# reach it too: it catches them (a handler, which exec resets to the default in the
# command, unlike an ignore) and waits on; SIGHUP still ends it, and the kernel then
# hangs up the command.
TERMINAL_DRAIN_WRAPPER = """
trap : INT QUIT
env "$@"
s=$?
sleep 0.2 2>/dev/null
exit "$s"
"""


def open_terminal(
    client: Any,
    instance: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    rows: int,
    cols: int,
    inside: Inside | None = None,
) -> tuple[str, WebSocket, WebSocket]:
    """Start ``argv`` on a PTY in ``instance``, where and as whom ``inside`` says;
    (operation, data socket, control socket)."""
    body: dict[str, Any] = {
        "command": ["sh", "-c", TERMINAL_DRAIN_WRAPPER, "vendetta-terminal", *argv],
        "environment": dict(env),
        "wait-for-websocket": True,
        "interactive": True,
        "width": cols,
        "height": rows,
    }
    if inside is not None:
        body |= inside.exec_fields(None, env)
    response = client.api.instances[instance].exec.post(json=body)
    body = response.json()
    operation = str(body["operation"])
    fds = body["metadata"]["metadata"]["fds"]
    resource = f"/1.0/operations/{operation_id(operation)}/websocket?secret="
    data = WebSocket.connect(client.websocket_url, resource + str(fds["0"]))
    try:
        control = WebSocket.connect(client.websocket_url, resource + str(fds["control"]))
    except BaseException:
        data.close()
        raise
    return operation, data, control


def exit_code(client: Any, operation: str, within: float = EXIT_WAIT) -> int:
    """The exit code LXD recorded for the exec ``operation`` (-1 if it never says)."""
    node = client.api.operations[operation_id(operation)]
    deadline = time.monotonic() + within
    while True:
        remaining = deadline - time.monotonic()
        try:
            meta = node.wait.get(params={"timeout": max(1, round(remaining))}).json()["metadata"]
        except pylxd.exceptions.NotFound:
            return -1  # LXD forgets finished operations after a few seconds
        if meta.get("status") != "Running" or remaining <= 0:
            break
    code = (meta.get("metadata") or {}).get("return")
    return int(code) if isinstance(code, int) else -1


class LxdTerminal(Terminal):
    def __init__(
        self, client: Any, operation: str, data: WebSocket, control: WebSocket, name: str
    ) -> None:
        self._client = client
        self._operation = operation
        self._data = data
        self._control = control
        self._name = name
        self._ended = False  # the output ended: the command has exited (or LXD went away)
        self._closed = False
        self._stdin = ThreadedWriter(f"{THREAD_PREFIX}stdin-{name}", data.send_binary)

    async def output(self) -> AsyncIterator[ExecChunk]:
        # LXD marks the end of the output with an empty message, then waits for us to
        # close the data socket before it finishes the operation.
        stream: ThreadedStream[bytes] = ThreadedStream(
            f"{THREAD_PREFIX}tty-{self._name}",
            lambda: (self._data.messages(), self._data.close),
            lambda exc: exc,
        )
        try:
            async for data in stream:
                yield ExecChunk(stdout=data)
        finally:
            await stream.aclose()
        self._ended = True
        if self._closed:
            return  # we hung up: nobody waits for an exit code
        code = await asyncio.to_thread(exit_code, self._client, self._operation)
        yield ExecChunk(exit_code=code)

    async def write(self, data: bytes) -> None:
        await self._stdin.write(data)

    async def resize(self, rows: int, cols: int) -> None:
        message = {"command": "window-resize", "args": {"width": str(cols), "height": str(rows)}}
        with contextlib.suppress(OSError):
            await asyncio.to_thread(self._control.send_text, json.dumps(message))

    def hang_up(self) -> None:
        """Blocking: SIGHUP to the command if it still runs, as a terminal hang-up would,
        then close both sockets (LXD 5.0 was seen ending it then too, but does not promise to)."""
        self._closed = True
        self._stdin.close()
        if not self._ended:
            with contextlib.suppress(OSError):
                self._control.send_text(
                    json.dumps({"command": "signal", "signal": int(signal.SIGHUP)})
                )
        self._control.close()
        self._data.close()

    async def close(self) -> None:
        if not self._closed:
            await asyncio.to_thread(self.hang_up)
