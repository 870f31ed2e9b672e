"""How workspaces are named to SSH clients (``NAME.vendetta``) and where the
proxy's host key lives: shared by the coordinator, which writes the entries
(``coordinator.ssh_entries``), and the CLI (``ssh-config``, ``ssh-proxy``).
"""

from __future__ import annotations

from pathlib import Path

from common.paths import ssh_dir

SUFFIX = ".vendetta"
# One alias for every workspace: the proxy presents the same host key for all.
HOST_KEY_ALIAS = "vendetta-workspaces"


def host_key_path(home: Path) -> Path:
    return ssh_dir(home) / "proxy_host_key"


def known_hosts_path(home: Path) -> Path:
    return ssh_dir(home) / "known_hosts"


def quoted(path: Path) -> str:
    """A path as ssh_config(5) takes it, spaces and all."""
    return '"' + str(path).replace('"', '\\"') + '"'
