"""Where vendetta keeps its state on the user's machine and on nodes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Any

from common.errors import InvalidArgumentError

# sockaddr_un.sun_path is 108 bytes including the NUL.
MAX_SOCKET_PATH = 107


def _state_root() -> Path:
    xdg = os.environ.get("XDG_STATE_HOME")
    return Path(xdg) if xdg else Path.home() / ".local" / "state"


def vendetta_home() -> Path:
    """The coordinator's folder: socket, pid, log, SQLite state, tunnels."""
    env = os.environ.get("VENDETTA_HOME")
    return Path(env).expanduser() if env else _state_root() / "vendetta"


def default_agent_dir() -> Path:
    env = os.environ.get("VENDETTA_AGENT_DIR")
    return Path(env).expanduser() if env else _state_root() / "vendetta-agent"


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) with mode 0700 and return it."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def private_file(path: Path, mode: str = "ab") -> IO[Any]:
    """Open ``path`` for writing, readable by its owner only (0600, also when it
    already existed with a looser mode): state, logs and keys are the user's."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if "a" in mode else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, mode)


def write_private(path: Path, data: str | bytes) -> None:
    """Replace ``path`` with ``data``, mode 0600."""
    with private_file(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def check_socket_path(path: Path) -> Path:
    if len(os.fsencode(str(path))) > MAX_SOCKET_PATH:
        raise InvalidArgumentError(
            f"socket path {path} is longer than {MAX_SOCKET_PATH} bytes, the limit of unix "
            "sockets: set VENDETTA_HOME (or the agent's --dir) to a shorter folder"
        )
    return path


def coordinator_socket(home: Path) -> Path:
    return home / "coordinator.sock"


def coordinator_pid(home: Path) -> Path:
    return home / "coordinator.pid"


def coordinator_log(home: Path) -> Path:
    return home / "coordinator.log"


def agent_socket(agent_dir: Path) -> Path:
    return agent_dir / "agent.sock"


DIAL_SOCKET = "dial.sock"


def dial_socket(agent_dir: Path) -> Path:
    """Beside agent.sock, with the same 0600 trust: raw connections into
    environments (nodeagent/dial_socket.py)."""
    return agent_dir / DIAL_SOCKET


def agent_pid(agent_dir: Path) -> Path:
    return agent_dir / "agent.pid"


def agent_log(agent_dir: Path) -> Path:
    return agent_dir / "agent.log"


def ssh_dir(home: Path) -> Path:
    """Keys and the `Host *.vendetta` entries the coordinator maintains."""
    return home / "ssh"


def ssh_entries(home: Path) -> Path:
    return ssh_dir(home) / "config"


def vendetta_client_key(home: Path) -> Path:
    """The key vendetta generates when the user has none (ssh-agent, ~/.ssh/id_*)."""
    return ssh_dir(home) / "id_ed25519"
