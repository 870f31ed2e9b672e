"""The SSH transport against a real sshd on loopback, with a real agent behind it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from common.errors import (
    FailedPreconditionError,
    HostKeyMismatchError,
    NodeUnreachableError,
    PermissionDeniedError,
)
from coordinator.agent_client import AgentClient
from coordinator.transports import SshTransport, scan_host_key
from tests.support.sshd import SshServer

pytestmark = pytest.mark.sshd

AGENT = str(Path(sys.executable).parent / "vendetta-agent")


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vd-ssh-", dir="/tmp"))
    yield path
    subprocess.run([AGENT, "--dir", str(path / "agent"), "stop"], capture_output=True, check=False)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def server(workdir: Path) -> Iterator[SshServer]:
    server = SshServer.start(workdir / "sshd", host="127.0.0.4")
    yield server
    server.stop()


def transport(server: SshServer, workdir: Path, **kw: object) -> SshTransport:
    args: dict[str, object] = {
        "node": "n1",
        "address": server.host,
        "port": server.port,
        "user": server.user,
        "host_key": server.host_public_key(),
        "tunnel_dir": workdir / "tunnels",
        "identity_file": str(server.client_key_path),
        "agent_command": [AGENT, "--dir", str(workdir / "agent")],
    }
    args.update(kw)
    return SshTransport(**args)  # type: ignore[arg-type]


@pytest.fixture
async def ssh(server: SshServer, workdir: Path) -> AsyncIterator[SshTransport]:
    t = transport(server, workdir)
    yield t
    await t.close()


async def test_scan_shows_the_key_sshd_presents(server: SshServer) -> None:
    key = await scan_host_key(server.host, server.port)
    assert key.get_fingerprint("sha256") == server.host_fingerprint()


async def test_tunnel_reaches_the_agent_and_comes_back(ssh: SshTransport, workdir: Path) -> None:
    info = await AgentClient(await ssh.connect()).info()
    assert info.socket_path == str(workdir / "agent" / "agent.sock")
    # the forwarded socket on our side is private
    assert ssh.local_socket.stat().st_mode & 0o777 == 0o600
    ssh.drop_connection()
    await ssh.wait_closed()  # returns: the caller learns the connection is gone
    again = await AgentClient(await ssh.connect()).info()
    assert again.agent_id == info.agent_id  # same agent, found running, not restarted


async def test_changed_host_key_is_refused(server: SshServer, workdir: Path) -> None:
    pinned = server.host_public_key()
    server.rotate_host_key(drop_connections=True)
    t = transport(server, workdir, host_key=pinned)
    with pytest.raises(HostKeyMismatchError) as exc:
        await t.connect()
    assert server.host_fingerprint() in str(exc.value) and "has changed" in str(exc.value)


@pytest.fixture
def other_key(workdir: Path) -> Path:
    other = workdir / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    return other


async def test_unaccepted_key_is_refused(server: SshServer, workdir: Path, other_key: Path) -> None:
    other = other_key
    with pytest.raises(PermissionDeniedError) as exc:
        await transport(server, workdir, identity_file=str(other)).connect()
    assert str(other) in str(exc.value) and "authorized_keys" in str(exc.value)


async def test_missing_agent_command_says_what_to_do(server: SshServer, workdir: Path) -> None:
    t = transport(server, workdir, agent_command=["/nonexistent/vendetta-agent"])
    with pytest.raises(FailedPreconditionError) as exc:
        await t.connect()
    assert "is vendetta installed on the node" in str(exc.value)


async def test_nothing_listening(workdir: Path, server: SshServer) -> None:
    server.stop()
    with pytest.raises(NodeUnreachableError) as exc:
        await transport(server, workdir).connect()
    assert f"{server.host}:{server.port}" in str(exc.value)
