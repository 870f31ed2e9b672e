"""The node agent as a ``systemd --user`` unit, where that keeps it running.

A user unit only helps if the user's manager outlives the SSH session that
started it, which is what lingering does (``loginctl enable-linger``): without
it the manager, and every unit in it, stops with the user's last session. So
``vendetta-agent ensure`` runs the agent as a unit when systemd is the init, the
user's manager answers ``systemctl --user`` (a non-interactive SSH session may
lack XDG_RUNTIME_DIR: it is set to /run/user/UID) and lingering is on (turned on
here if the user may: without polkit only root may). Otherwise the agent runs
as a detached process with a pid file, as before.

The unit has ``KillMode=process``: stopping or restarting it (an upgrade) ends
the agent alone, never what it started that must outlive it (a libvirt session
daemon and its QEMU guests); the services of workspaces run inside their
environments anyway. Like the detached agent, it runs with the SSH session's
PATH, XDG folders and engine variables, and appends to the agent's log. This
module runs on the node; ``agent_process`` uses it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import pwd
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from common.errors import FailedPreconditionError, UnavailableError
from common.paths import agent_log, default_agent_dir
from common.process import log_tail

T = TypeVar("T")

# `StandardOutput=append:` came with systemd 240.
MIN_SYSTEMD = 240
# "detached" keeps the agent off systemd whatever the node offers.
RUNNER_ENV = "VENDETTA_AGENT_RUNNER"
# What the agent needs from the SSH session's environment (the detached agent inherits it).
PASSED_ENV = (
    "PATH", "LANG", "LC_ALL", "XDG_DATA_HOME", "XDG_STATE_HOME", "XDG_CACHE_HOME",
    "XDG_CONFIG_HOME", "DOCKER_HOST", "LXD_DIR", "LIBVIRT_DEFAULT_URI",
)  # fmt: skip
# In the agent's folder: vendetta turned lingering on (so a purge turns it off again).
LINGER_MARK = "linger-enabled"
SYSTEMCTL_TIMEOUT = 30.0


@dataclass(frozen=True)
class Facts:
    """What the node offers for a user unit."""

    forced_detached: bool = False  # VENDETTA_AGENT_RUNNER=detached
    systemd_init: bool = False  # /run/systemd/system exists
    manager: str = ""  # the user manager's systemd version; "" if it does not answer
    manager_error: str = ""
    linger: bool = False
    linger_error: str = ""  # why lingering could not be turned on
    linger_enabled_now: bool = False  # this call turned it on
    user: str = ""


@dataclass(frozen=True)
class Plan:
    unit: bool
    why: str


def _major(version: str) -> int:
    digits = version.split(".", 1)[0].split("~", 1)[0]
    return int(digits) if digits.isdigit() else 0


def decide(f: Facts) -> Plan:
    """A unit when it outlives the SSH session; else detached, saying why."""
    if f.forced_detached:
        return Plan(False, f"{RUNNER_ENV}=detached")
    if not f.systemd_init:
        return Plan(False, "systemd is not the node's init")
    if not f.linger:
        return Plan(
            False,
            f"lingering is off for {f.user or 'the user'} and could not be turned on"
            f"{f' ({f.linger_error})' if f.linger_error else ''}: a user unit would stop "
            f"with its last session (`sudo loginctl enable-linger {f.user or 'USER'}` "
            "lets the agent run as a unit)",
        )
    if not f.manager:
        return Plan(
            False,
            f"no systemd user manager answers{f' ({f.manager_error})' if f.manager_error else ''}",
        )
    if _major(f.manager) < MIN_SYSTEMD:
        return Plan(False, f"the user's systemd {f.manager} is older than {MIN_SYSTEMD}")
    return Plan(True, "lingering turned on by vendetta" if f.linger_enabled_now else "lingering on")


def unit_name(agent_dir: Path) -> str:
    """vendetta-agent.service for the default folder; others get one of their own."""
    if agent_dir == default_agent_dir().expanduser().absolute():
        return "vendetta-agent.service"
    digest = hashlib.sha256(str(agent_dir).encode()).hexdigest()[:8]
    return f"vendetta-agent-{digest}.service"


def unit_path(agent_dir: Path) -> Path:
    # Where the user manager looks with its default environment (not the session's).
    return Path.home() / ".config" / "systemd" / "user" / unit_name(agent_dir)


def describe(agent_dir: Path, unit: bool, pid_file: Path, why: str = "") -> str:
    """How the agent runs, for `node test` and the agent's status."""
    if unit:
        return f"systemd --user unit {unit_name(agent_dir)}" + (f" ({why})" if why else "")
    return f"detached process, pid file {pid_file}" + (f" ({why})" if why else "")


def user_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for systemctl/loginctl: XDG_RUNTIME_DIR (and the user bus) set
    when a non-interactive SSH session left them out."""
    env = dict(os.environ if base is None else base)
    if not env.get("XDG_RUNTIME_DIR"):
        env["XDG_RUNTIME_DIR"] = f"/run/user/{os.getuid()}"
    bus = Path(env["XDG_RUNTIME_DIR"]) / "bus"
    if not env.get("DBUS_SESSION_BUS_ADDRESS") and bus.exists():
        env["DBUS_SESSION_BUS_ADDRESS"] = f"unix:path={bus}"
    return env


async def _run(*argv: str, timeout: float = SYSTEMCTL_TIMEOUT) -> tuple[int, str]:
    """Exit status and output (stdout, then stderr) of ``argv``; 127 if it is missing."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=user_env(),
        )
    except OSError as exc:
        return 127, str(exc)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return 124, f"{argv[0]} timed out"
    text = (out.decode(errors="replace") + err.decode(errors="replace")).strip()
    return proc.returncode or 0, text


def systemctl(*args: str) -> Awaitable[tuple[int, str]]:
    return _run("systemctl", "--user", *args)


def _user() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


async def _linger(user: str) -> bool:
    rc, out = await _run("loginctl", "show-user", str(os.getuid()), "-p", "Linger", "--value")
    if rc == 0 and out in ("yes", "no"):
        return out == "yes"
    # No session known to logind yet: lingering is this file.
    return Path("/var/lib/systemd/linger", user).exists()


async def _manager(wait: float) -> tuple[str, str]:
    """The user manager's version, or "" and why not; waits up to ``wait`` seconds for a
    manager that lingering just started."""
    deadline = time.monotonic() + wait
    while True:
        rc, out = await systemctl("show", "--property=Version", "--value")
        if rc == 0 and out:
            return out.split()[0], ""
        if time.monotonic() >= deadline:
            return "", out.splitlines()[-1] if out else f"systemctl --user exited {rc}"
        await asyncio.sleep(0.5)


async def facts() -> Facts:
    """Look at the node; turn lingering on if it is off and the user may."""
    if os.environ.get(RUNNER_ENV, "").strip().lower() == "detached":
        return Facts(forced_detached=True)
    if not Path("/run/systemd/system").is_dir():
        return Facts()
    user = _user()
    linger = await _linger(user)
    enabled_now, linger_error = False, ""
    if not linger:
        rc, out = await _run("loginctl", "enable-linger")
        linger = await _linger(user)
        enabled_now = linger
        if not linger:
            linger_error = f"loginctl enable-linger: {out.splitlines()[-1] if out else rc}"
    if not linger:
        return Facts(systemd_init=True, linger_error=linger_error, user=user)
    manager, manager_error = await _manager(10.0 if enabled_now else 2.0)
    return Facts(
        systemd_init=True,
        manager=manager,
        manager_error=manager_error,
        linger=True,
        linger_enabled_now=enabled_now,
        user=user,
    )


def _quote(arg: str) -> str:
    """One word of a unit's ExecStart= or Environment=, as systemd unquotes it."""
    if "\n" in arg:
        raise FailedPreconditionError(f"cannot put a newline into a systemd unit: {arg!r}")
    escaped = arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'"{escaped}"'


def render(argv: Sequence[str], env: Mapping[str, str], log: Path, agent_dir: Path) -> str:
    """The unit's text: ``argv`` with the passed-on part of ``env``, appending to ``log``."""
    exec_start = " ".join(_quote(a).replace("$", "$$") for a in argv)
    lines = [
        "# Written by `vendetta-agent ensure`; replaced at upgrades, removed by its `stop`.",
        "[Unit]",
        f"Description=vendetta node agent ({agent_dir})",
        "",
        "[Service]",
        "Type=simple",
        f"ExecStart={exec_start}",
        *(
            f"Environment={_quote(f'{k}={env[k]}')}"
            for k in (*PASSED_ENV, *sorted(k for k in env if k.startswith("VENDETTA_")))
            if k in env and "\n" not in env[k]
        ),
        # Restarts and upgrades end the agent alone, not what it started (QEMU guests of
        # a libvirt session daemon): they must outlive it.
        "KillMode=process",
        "TimeoutStopSec=20",
        "Restart=on-failure",
        "RestartSec=2",
        "UMask=0077",
        f"StandardOutput={_quote(f'append:{log}')}",
        "StandardError=inherit",
        "",
        "[Install]",
        "WantedBy=default.target",
        "",
    ]
    return "\n".join(lines)


async def _checked(*args: str) -> str:
    rc, out = await systemctl(*args)
    if rc != 0:
        raise FailedPreconditionError(f"`systemctl --user {' '.join(args)}` failed: {out}")
    return out


async def main_pid(agent_dir: Path) -> int:
    """The unit's running main process, 0 if the unit is not there or not running."""
    if not await asyncio.to_thread(unit_path(agent_dir).exists):
        return 0
    rc, out = await systemctl("show", "--property=MainPID", "--value", unit_name(agent_dir))
    return int(out) if rc == 0 and out.isdigit() else 0


async def start(
    agent_dir: Path,
    argv: list[str],
    ready: Callable[[], Awaitable[T | None]],
    timeout: float = 30.0,
) -> tuple[T, int]:
    """Write the unit, (re)start it and wait until ``ready()`` returns something."""
    name, path, log = unit_name(agent_dir), unit_path(agent_dir), agent_log(agent_dir)
    text = render(argv, os.environ, log, agent_dir)
    await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
    await asyncio.to_thread(_write, path, text)
    await _checked("daemon-reload")
    await _checked("enable", name)  # started again when the node boots (lingering)
    await _checked("restart", name)
    deadline = time.monotonic() + timeout
    last_state = 0.0
    while time.monotonic() < deadline:
        result = await ready()
        if result is not None:
            return result, await main_pid(agent_dir)
        if time.monotonic() - last_state > 1.0:
            last_state = time.monotonic()
            _, state = await systemctl("show", "--property=ActiveState", "--value", name)
            if state == "failed":
                raise FailedPreconditionError(
                    f"the node agent's unit {name} failed at start; its log {log} ends "
                    f"with:\n{await asyncio.to_thread(log_tail, log)}"
                )
        await asyncio.sleep(0.1)
    raise UnavailableError(
        f"the node agent's unit {name} did not answer within {timeout:.0f}s; see {log} "
        f"and `systemctl --user status {name}`:\n{await asyncio.to_thread(log_tail, log)}"
    )


async def remove(agent_dir: Path) -> bool:
    """Stop and remove the unit (the agent alone: KillMode=process); False if none."""
    path = unit_path(agent_dir)
    if not await asyncio.to_thread(path.exists):
        return False
    name = unit_name(agent_dir)
    was_running = await main_pid(agent_dir) > 0
    # Not a user manager any more (lingering off, no session): nothing runs in it.
    await systemctl("disable", "--now", name)
    await asyncio.to_thread(path.unlink, missing_ok=True)
    await systemctl("daemon-reload")
    await systemctl("reset-failed", name)
    return was_running


def _write(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``, mode 0600, whole or not at all."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def mark_linger(agent_dir: Path) -> None:
    _write(agent_dir / LINGER_MARK, f"{_user()}\n")
