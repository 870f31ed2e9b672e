"""Self-test of tests/support/sshd.py against a real OpenSSH sshd on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from pathlib import Path

import asyncssh
import pytest

from tests.support.sshd import SshServer

pytestmark = pytest.mark.sshd

KnownHosts = tuple[list[asyncssh.SSHKey], list[asyncssh.SSHKey], list[asyncssh.SSHKey]]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[SshServer]:
    server = SshServer.start(tmp_path / "sshd", host="127.0.0.2")
    try:
        yield server
    finally:
        server.stop()


def pinned(host_key_line: str) -> KnownHosts:
    """known_hosts trusting exactly this host key (no CAs, no revocations)."""
    return ([asyncssh.import_public_key(host_key_line)], [], [])


async def connect(
    server: SshServer,
    host_key_line: str,
    client_keys: Sequence[asyncssh.SSHKey | Path] | None = None,
) -> asyncssh.SSHClientConnection:
    keys = list(client_keys) if client_keys is not None else [server.client_key_path]
    return await asyncssh.connect(
        server.host,
        server.port,
        username=server.user,
        known_hosts=pinned(host_key_line),
        client_keys=[str(k) if isinstance(k, Path) else k for k in keys],
        agent_path=None,
        config=None,
    )


async def test_runs_a_command_with_the_pinned_host_key(server: SshServer) -> None:
    async with await connect(server, server.host_public_key()) as conn:
        result = await conn.run("echo hello", check=True)
        assert result.stdout == "hello\n"
        server_key = conn.get_server_host_key()
        assert server_key is not None
        assert server_key.get_fingerprint("sha256") == server.host_fingerprint()
    assert server.host_fingerprint().startswith("SHA256:")


async def test_a_changed_host_key_is_refused(server: SshServer) -> None:
    old_key = server.host_public_key()
    old_fingerprint = server.host_fingerprint()
    port = server.port

    await asyncio.to_thread(server.rotate_host_key)

    assert server.port == port
    assert server.host_public_key() != old_key
    assert server.host_fingerprint() != old_fingerprint
    with pytest.raises(asyncssh.HostKeyNotVerifiable):
        await connect(server, old_key)
    async with await connect(server, server.host_public_key()) as conn:
        assert (await conn.run("echo again", check=True)).stdout == "again\n"


async def test_an_unauthorized_client_key_is_refused(server: SshServer) -> None:
    stranger = asyncssh.generate_private_key("ssh-ed25519")
    with pytest.raises(asyncssh.PermissionDenied):
        await connect(server, server.host_public_key(), [stranger])

    public_line = stranger.export_public_key("openssh").decode()
    await asyncio.to_thread(server.authorize, public_line)
    async with await connect(server, server.host_public_key(), [stranger]) as conn:
        assert (await conn.run("id -u", check=True)).stdout == "0\n"


async def test_stop_drops_open_connections(server: SshServer) -> None:
    conn = await connect(server, server.host_public_key())
    try:
        await asyncio.to_thread(server.stop)
        await asyncio.wait_for(conn.wait_closed(), timeout=5)
    finally:
        conn.close()
