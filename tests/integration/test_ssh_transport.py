"""The SSH transport against a real sshd on loopback, with a real agent behind it."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncssh
import pytest

from cli import tunnel_master
from common.dial_wire import encode
from common.errors import (
    FailedPreconditionError,
    HostKeyMismatchError,
    NodeUnreachableError,
    PermissionDeniedError,
)
from common.forwarder import Forwarder, join
from coordinator.agent_client import AgentClient
from coordinator.transports import SshTransport, scan_host_key
from coordinator.transports.openssh_tunnel import OpenSshTunnel, TunnelNotStarted
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


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):  # a stat whose process just went: ESRCH
        return True
    return state in ("Z", "X")  # exited; reaped by whoever adopted it, or not yet


async def test_the_tunnel_is_an_openssh_child_that_ends_with_the_transport(
    ssh: SshTransport,
) -> None:
    await AgentClient(await ssh.connect()).info()
    pid = ssh.tunnel_pid
    assert pid is not None, "the tunnel should run in an `ssh -L` child"
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"-L" in cmdline and f"{ssh.local_socket}:".encode() in b" ".join(cmdline)
    beside = [
        ssh.local_socket.with_name(ssh.local_socket.name + s) for s in (".known_hosts", ".ssh.log")
    ]
    for path in beside:  # its files are private, as the socket
        assert path.stat().st_mode & 0o777 == 0o600, path
    # Its second forward reaches the agent's dial socket: the agent answers the
    # handshake (here, that it has no such workspace).
    dial = ssh.dial_socket()
    assert dial == ssh.local_socket.with_suffix(".dial")
    assert dial.stat().st_mode & 0o777 == 0o600
    reader, writer = await asyncio.open_unix_connection(str(dial))
    hello = {"workspace": "nowhere", "provider": "docker", "host": "127.0.0.1", "port": 80}
    writer.write(encode(hello))
    answer = json.loads(await asyncio.wait_for(reader.readline(), 30))
    writer.close()
    assert "error" in answer and "nowhere" in answer["error"], answer
    control = ssh.control_socket()
    assert control is not None and control.stat().st_mode & 0o777 == 0o600
    await ssh.close()
    assert _gone(pid)
    # ... and go with it: a removed node leaves nothing in the tunnels folder.
    assert not [p for p in [ssh.local_socket, dial, control, *beside] if p.exists()]


async def test_the_openssh_child_opens_connections_from_the_node_for_the_proxy(
    ssh: SshTransport,
) -> None:
    """cli/tunnel_master.py through the child's control socket: a TCP server on the
    node (this machine) reached from there, bytes both ways and each way's end."""
    got: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"node says hi\n")
        got.append(await reader.read())
        writer.write(b"bye")
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    await AgentClient(await ssh.connect()).info()
    control = ssh.control_socket()
    assert control is not None
    proxy_side, service_side = join(Forwarder(), Forwarder())
    ours, theirs = socket.socketpair()
    async with server:
        port = server.sockets[0].getsockname()[1]
        assert await tunnel_master.connect(str(control), "127.0.0.1", port, service_side)
        pipes = service_side.transport  # both ways hold a bulk transfer's packets
        for end in (pipes.reader, pipes.writer):
            fd = end.get_extra_info("pipe").fileno()
            assert fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) == tunnel_master.PIPE_SIZE
        await asyncio.get_running_loop().create_unix_connection(lambda: proxy_side, sock=ours)
        reader, writer = await asyncio.open_unix_connection(sock=theirs)
        assert await asyncio.wait_for(reader.readline(), 30) == b"node says hi\n"
        payload = os.urandom(3_000_000)
        writer.write(payload)
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 30) == b"bye"
        writer.close()
    assert got == [payload]
    await ssh.close()
    # No master: no connection, and no ssh of its own to the host.
    assert not await tunnel_master.connect(str(control), "127.0.0.1", port, Forwarder())
    assert ssh.tunnel_pid is None


async def test_without_openssh_the_tunnel_stays_in_the_coordinator(
    server: SshServer, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")  # no `ssh` to run
    t = transport(server, workdir)
    try:
        info = await AgentClient(await t.connect()).info()
        assert info.socket_path == str(workdir / "agent" / "agent.sock")
        assert t.tunnel_pid is None
        assert t.dial_socket() is None  # ssh-proxy then uses Dial through this process
    finally:
        await t.close()


async def test_a_key_openssh_refuses_falls_back_to_asyncssh(
    server: SshServer, workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # OpenSSH ignores a private key others may read; asyncssh takes it.
    loose = workdir / "loose-key"
    shutil.copy(server.client_key_path, loose)
    loose.chmod(0o644)
    t = transport(server, workdir, identity_file=str(loose))
    try:
        info = await AgentClient(await t.connect()).info()
        assert info.socket_path == str(workdir / "agent" / "agent.sock")
        assert t.tunnel_pid is None
        assert "the tunnel stays in the coordinator" in caplog.text
    finally:
        await t.close()


def test_the_child_ends_when_the_coordinator_is_killed(server: SshServer, workdir: Path) -> None:
    """SIGKILL leaves no chance to stop it: its remote command's EOF must."""
    holder = f"""
import asyncio, sys
from pathlib import Path
from coordinator.transports import SshTransport
from coordinator.agent_client import AgentClient
async def main():
    t = SshTransport(node="n1", address={server.host!r}, port={server.port},
        user={server.user!r}, host_key={server.host_public_key()!r},
        tunnel_dir=Path({str(workdir / "tunnels")!r}),
        identity_file={str(server.client_key_path)!r},
        agent_command=[{AGENT!r}, "--dir", {str(workdir / "agent")!r}])
    await AgentClient(await t.connect()).info()
    print(t.tunnel_pid, flush=True)
    await asyncio.sleep(600)
asyncio.run(main())
"""
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        pid = int(proc.stdout.readline())
        assert not _gone(pid)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 15
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(pid), "the ssh child outlived the coordinator"


async def test_the_openssh_child_refuses_a_host_key_other_than_the_pinned(
    server: SshServer, workdir: Path
) -> None:
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    (workdir / "tunnels").mkdir(exist_ok=True)
    with pytest.raises(TunnelNotStarted, match="Host key verification failed"):
        await OpenSshTunnel.start(
            node="n1",
            address=server.host,
            port=server.port,
            user=server.user,
            host_key_line=other,
            identity_file=str(server.client_key_path),
            extra_keys=[],
            local_socket=workdir / "tunnels" / "n1.sock",
            remote_socket="/nonexistent.sock",
            remote_dial_socket="/nonexistent.dial",
        )
    assert not (workdir / "tunnels" / "n1.sock").exists()


async def test_a_cancelled_start_leaves_no_child(workdir: Path, server: SshServer) -> None:
    # A port that takes the TCP connection and never says a word: ssh waits there.
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        local = workdir / "tunnels" / "mute.sock"
        local.parent.mkdir(exist_ok=True)
        start = asyncio.create_task(
            OpenSshTunnel.start(
                node="mute",
                address="127.0.0.1",
                port=mute.getsockname()[1],
                user=server.user,
                host_key_line=server.host_public_key(),
                identity_file=str(server.client_key_path),
                extra_keys=[],
                local_socket=local,
                remote_socket="/nonexistent.sock",
                remote_dial_socket="/nonexistent.dial",
            )
        )
        for _ in range(200):  # up to 10 s
            if children := _children_with(str(local)):
                break
            await asyncio.sleep(0.05)
        assert children, "ssh never started"
        start.cancel()
        with pytest.raises(asyncio.CancelledError):
            await start
        for _ in range(100):  # up to 5 s
            if all(_gone(p) for p in children):
                break
            await asyncio.sleep(0.05)
        assert all(_gone(p) for p in children), "a cancelled start left its ssh running"


def _children_with(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if text.encode() in cmdline and b"ssh" in cmdline.split(b"\0")[0]:
                found.append(int(entry.name))
    return found
