"""Talking to the QEMU guest agent inside a guest, through libvirt. Blocking: run in a thread.

``guest-exec`` with ``capture-output`` runs a command (argv, no shell) and
``guest-exec-status`` returns its exit code and base64 output once it has
exited (qemu-ga 7.2 hands output over only at the end).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from typing import Any

import libvirt
import libvirt_qemu

from common.errors import FailedPreconditionError

# Seconds libvirt waits for one agent answer.
COMMAND_TIMEOUT = 10
PING_TIMEOUT = 1

# The guest's base environment: guest-exec replaces it entirely when env is given.
BASE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}


def command(
    dom: libvirt.virDomain, execute: str, timeout: int = COMMAND_TIMEOUT, **args: Any
) -> Any:
    """One agent command; its ``return`` value. Raises libvirtError."""
    request: dict[str, Any] = {"execute": execute}
    if args:
        request["arguments"] = args
    answer = libvirt_qemu.qemuAgentCommand(dom, json.dumps(request), timeout, 0)
    return json.loads(answer).get("return")


def ping(dom: libvirt.virDomain) -> bool:
    try:
        command(dom, "guest-ping", timeout=PING_TIMEOUT)
    except libvirt.libvirtError:
        return False
    return True


def exec_start(
    dom: libvirt.virDomain, argv: Sequence[str], env: Mapping[str, str], *, capture: bool
) -> int:
    merged = {**BASE_ENV, **env}
    result = command(
        dom,
        "guest-exec",
        path=argv[0],
        arg=list(argv[1:]),
        env=[f"{k}={v}" for k, v in merged.items()],
        **{"capture-output": capture},
    )
    return int(result["pid"])


def exec_status(dom: libvirt.virDomain, pid: int) -> tuple[bool, int, bytes, bytes]:
    """(exited, exit code, stdout, stderr) of a guest-exec'd process."""
    status = command(dom, "guest-exec-status", pid=pid)
    if not status.get("exited"):
        return False, -1, b"", b""
    cut = [name for name in ("out", "err") if status.get(f"{name}-truncated")]
    if cut:  # never hand on a cut output as if it were all of it
        raise FailedPreconditionError(
            f"the command's std{'/std'.join(cut)} passed what the guest agent keeps of a "
            "command's output (16 MiB) and was cut; write it to a file in the guest instead"
        )
    out = base64.b64decode(status.get("out-data", ""))
    err = base64.b64decode(status.get("err-data", ""))
    # Killed by a signal: report it the way a shell does.
    code = int(status["exitcode"]) if "exitcode" in status else 128 + int(status.get("signal", 0))
    return True, code, out, err
