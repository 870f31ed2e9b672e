"""The `Host <workspace>.vendetta` entries: one file the coordinator keeps
current as workspaces come and go, which ~/.ssh/config includes once
(`vendetta ssh-config`), so that any SSH client reaches a workspace.

Each entry's ProxyCommand is `vendetta ssh-proxy NAME`: an SSH server on the
user's own machine, speaking over the client's stdin/stdout, that runs the
session through the coordinator's Connect stream. Nothing listens on the
network and no sshd is needed inside the environment, whatever the provider.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
from collections.abc import Iterable
from pathlib import Path

from common.paths import private_dir, ssh_entries, write_private
from common.ssh_hosts import HOST_KEY_ALIAS, SUFFIX, host_key_path, known_hosts_path, quoted
from coordinator.ssh_keys import ensure_key

log = logging.getLogger("vendetta.coordinator")


def cli_command() -> list[str]:
    """How an SSH client on this machine runs our CLI (the coordinator's own install)."""
    script = Path(sys.executable).with_name("vendetta")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "cli.main"]


def render(home: Path, workspaces: Iterable[str]) -> str:
    lines = [
        "# Written by the vendetta coordinator: one entry per workspace, rewritten as",
        "# workspaces are created and destroyed. Do not edit; `vendetta ssh-config`",
        "# includes it from ~/.ssh/config.",
    ]
    cli = [*cli_command(), "--home", str(home), "ssh-proxy"]
    for name in sorted(workspaces):
        proxy = shlex.join([*cli, name])
        lines += [
            "",
            f"Host {name}{SUFFIX}",
            f"  ProxyCommand {proxy}",
            f"  HostKeyAlias {HOST_KEY_ALIAS}",
            f"  UserKnownHostsFile {quoted(known_hosts_path(home))}",
            "  StrictHostKeyChecking yes",
            "  UpdateHostKeys no",
            "  CheckHostIP no",
            "  LogLevel ERROR",
        ]
    return "\n".join(lines) + "\n"


class SshEntries:
    """Keeps ``<home>/ssh/config`` and the proxy's host key and known_hosts."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.path = ssh_entries(home)
        self._written: frozenset[str] | None = None

    def prepare(self) -> None:
        key = ensure_key(host_key_path(self.home), "vendetta workspace proxy")
        line = key.export_public_key().decode().strip()
        known = f"{HOST_KEY_ALIAS} {line}\n"
        kh = known_hosts_path(self.home)
        if not kh.exists() or kh.read_text() != known:
            write_private(kh, known)

    def write(self, workspaces: Iterable[str]) -> None:
        names = frozenset(workspaces)
        if names == self._written and self.path.exists():
            return
        private_dir(self.path.parent)
        tmp = self.path.with_name(self.path.name + ".tmp")
        write_private(tmp, render(self.home, names))
        os.replace(tmp, self.path)  # readers never see half a file
        self._written = names

    async def write_async(self, workspaces: Iterable[str]) -> None:
        names = list(workspaces)
        try:
            await asyncio.to_thread(self.write, names)
        except OSError as exc:
            log.warning("could not write the SSH entries %s: %s", self.path, exc)
