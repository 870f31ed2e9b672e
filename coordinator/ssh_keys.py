"""Which SSH key a node should accept: the user's own, else one vendetta makes."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import asyncssh
from asyncssh.public_key import load_default_keypairs

from common.errors import InvalidArgumentError
from common.paths import private_dir, write_private


def ensure_key(path: Path, comment: str) -> asyncssh.SSHKey:
    """Load the ed25519 key at ``path``, generating it (0600, and a .pub) if missing."""
    private_dir(path.parent)
    if path.exists():
        return asyncssh.read_private_key(path)
    key = asyncssh.generate_private_key("ssh-ed25519", comment=comment)
    write_private(path, key.export_private_key())
    write_private(path.with_name(path.name + ".pub"), key.export_public_key())
    return key


def read_identity(path: str) -> asyncssh.SSHKey:
    """The private key of --identity, or an error saying what to do. Blocking."""
    try:
        return asyncssh.read_private_key(path)
    except (OSError, asyncssh.KeyImportError) as exc:
        raise InvalidArgumentError(
            f"cannot use the key {path}: {exc} (vendetta cannot ask for a passphrase: "
            "load the key into ssh-agent and leave out --identity)"
        ) from exc


def _line(key: asyncssh.SSHKey) -> str:
    return key.export_public_key("openssh").decode().strip()


async def _agent_key() -> str | None:
    with contextlib.suppress(OSError, asyncssh.Error, ValueError):
        agent = await asyncssh.connect_agent()
        if agent is not None:
            try:
                keys = await agent.get_keys()
            finally:
                agent.close()
            if keys:
                return _line(asyncssh.import_public_key(keys[0].public_data))
    return None


async def key_for_node(identity_file: str, vendetta_key: Path) -> tuple[str, str]:
    """(public key line, where it comes from): --identity, else the first of
    ~/.ssh/id_*, else ssh-agent's first key, else vendetta's key (made if missing)."""
    if identity_file:
        key = await asyncio.to_thread(read_identity, identity_file)
        return _line(key), identity_file
    defaults = await asyncio.to_thread(load_default_keypairs)
    if defaults:
        first = defaults[0]
        return _line(
            asyncssh.import_public_key(first.public_data)
        ), f"~/.ssh ({first.get_algorithm()})"
    agent = await _agent_key()
    if agent is not None:
        return agent, "ssh-agent"
    made = not vendetta_key.exists()
    key = await asyncio.to_thread(ensure_key, vendetta_key, "vendetta")
    return _line(key), f"{vendetta_key}{' (generated now)' if made else ''}"
