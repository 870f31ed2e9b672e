"""The agent's gRPC tunnel carried by OpenSSH: `ssh -L LOCAL_SOCKET:AGENT_SOCKET`
in a child process, beside the coordinator's asyncssh connection to the node.

Every byte to and from a node's agent goes through this tunnel: workspace
sessions, `ssh NAME.vendetta` forwards and file copies, logs, every RPC. In
asyncssh each 32 KiB SSH packet (the most sshd takes on a channel) is a turn
of the coordinator's event loop; OpenSSH does the same work in C, in its own
process. Measured on one machine (docs/performance.md): the coordinator's CPU
per 800 MB out of a workspace fell from 4.2 s to 1.7 s, the ssh child using
0.75 s.

The asyncssh connection still installs and starts the agent, forwards
service ports and tells when the node goes. The child is tied to the
coordinator's life without any signal set-up: its remote command reads its
stdin, a pipe only the coordinator holds, so when the coordinator ends (even
by SIGKILL) the session gets EOF, the command exits, and ssh exits with it.
Whatever keeps the child from coming up (no `ssh` here, a key only asyncssh
can use, a ProxyJump only in ~/.ssh/config) makes the caller fall back to
asyncssh's own forward: the tunnel is then slower, never missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
from pathlib import Path
from typing import BinaryIO

# Seconds for the child to connect, log in and listen on the local socket.
START_TIMEOUT = 20.0
# Seconds the child gets to leave after its stdin closes, then after SIGTERM.
STOP_GRACE = 2.0
# Set to "asyncssh" to keep the tunnel in the coordinator's process (debugging).
ENV_TUNNEL = "VENDETTA_TUNNEL"
_CIPHERS = "aes128-gcm@openssh.com,chacha20-poly1305@openssh.com,aes256-gcm@openssh.com"


class TunnelNotStarted(Exception):
    """The child did not come up; the message says why (its stderr, or the wait)."""


def wanted() -> bool:
    return os.environ.get(ENV_TUNNEL, "openssh") != "asyncssh" and shutil.which("ssh") is not None


class OpenSshTunnel:
    """One `ssh -L` child for one node's agent socket."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        known_hosts: Path,
        log: Path,
        dial: Path,
        control: Path,
    ) -> None:
        self._proc = proc
        self._known_hosts = known_hosts
        self._log_path = log  # these beside the socket, and gone with it
        self.dial_socket = dial
        self.control_socket = control

    @classmethod
    async def start(
        cls,
        *,
        node: str,
        address: str,
        port: int,
        user: str,
        host_key_line: str,
        identity_file: str,
        extra_keys: list[Path],
        local_socket: Path,
        remote_socket: str,
        remote_dial_socket: str,
    ) -> OpenSshTunnel:
        """The child, once LOCAL_SOCKET accepts connections; TunnelNotStarted if not.
        A second forward reaches the agent's dial socket (nodeagent/dial_socket.py):
        ssh-proxy's `-L`/`-D` bytes then pass through this child alone, not the
        coordinator's event loop. It is named like LOCAL_SOCKET, as long."""
        ssh = shutil.which("ssh")
        if ssh is None:
            raise TunnelNotStarted("no `ssh` (OpenSSH's client) on this machine")
        state = local_socket.parent
        alias = f"vendetta-node-{node}"
        known_hosts = state / f"{local_socket.name}.known_hosts"
        with _private(known_hosts) as f:
            f.write(f"{alias} {_key_only(host_key_line)}\n".encode())
        log_path = state / f"{local_socket.name}.ssh.log"
        dial_socket = local_socket.with_suffix(".dial")
        control_socket = local_socket.with_suffix(".ctl")
        argv = [
            ssh, "-T", "-F", "/dev/null",  # not the user's ~/.ssh/config: these options only
            "-p", str(port),
            "-o", "BatchMode=yes",
            "-o", f"HostKeyAlias={alias}",
            "-o", f"UserKnownHostsFile={known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "UpdateHostKeys=no",
            "-o", "CheckHostIP=no",
            "-o", "ConnectTimeout=15",
            "-o", "ServerAliveInterval=10",
            "-o", "ServerAliveCountMax=3",
            "-o", "ExitOnForwardFailure=yes",
            "-o", "StreamLocalBindUnlink=yes",
            "-o", "StreamLocalBindMask=0177",  # the socket is the coordinator's user's alone
            "-o", "ForwardAgent=no",
            "-o", "ForwardX11=no",
            "-o", "PermitLocalCommand=no",
            # A control socket (0600: ssh binds it under umask 0177) through which
            # ssh-proxy has this child open a connection from the node to a published
            # port (cli/tunnel_master.py), with no other process in between.
            "-o", "ControlMaster=yes",
            "-o", f"ControlPath={control_socket}",
            "-o", "ControlPersist=no",
            "-o", "LogLevel=ERROR",
            "-o", f"Ciphers={_CIPHERS}",
            *_key_args(identity_file, extra_keys),
            "-L", f"{local_socket}:{remote_socket}",
            "-L", f"{dial_socket}:{remote_dial_socket}",
        ]  # fmt: skip
        if user:
            argv += ["-l", user]
        # The remote command ends when the coordinator does (see the module's docstring).
        argv += ["--", address, "exec cat >/dev/null"]
        for stale in (local_socket, control_socket):  # ssh would not take a stale control
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        with _private(log_path) as log_file:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=log_file,
                start_new_session=True,  # not the terminal's ^C: the coordinator stops it
            )
        tunnel = cls(proc, known_hosts, log_path, dial_socket, control_socket)
        try:
            await asyncio.wait_for(tunnel._until_listening(local_socket), START_TIMEOUT)
        except TimeoutError:
            said = tunnel._said()  # before close() takes the log away
            await tunnel.close()
            raise TunnelNotStarted(
                f"`ssh -L` did not listen within {START_TIMEOUT:.0f} s{said}"
            ) from None
        except TunnelNotStarted:
            await tunnel.close()
            raise
        except BaseException:  # cancelled (the coordinator stopping): no child left behind
            tunnel.kill()
            tunnel._remove_files()
            raise
        return tunnel

    async def _until_listening(self, path: Path) -> None:
        while True:
            if self._proc.returncode is not None:
                raise TunnelNotStarted(f"`ssh -L` exited {self._proc.returncode}{self._said()}")
            if await asyncio.to_thread(_accepts, path):
                return
            await asyncio.sleep(0.05)

    def _said(self) -> str:
        try:
            text = self._log_path.read_text(errors="replace").strip()
        except OSError:
            return ""
        return f": {text[-400:]}" if text else ""

    @property
    def pid(self) -> int:
        return int(self._proc.pid)

    @property
    def running(self) -> bool:
        return self._proc.returncode is None

    async def wait(self) -> None:
        """Until the child exits (the node went, or it was stopped)."""
        await self._proc.wait()

    def kill(self) -> None:
        """At once, as a dropped connection (tests prove reconnects with it)."""
        with contextlib.suppress(ProcessLookupError):
            self._proc.kill()

    async def close(self) -> None:
        proc = self._proc
        if proc.returncode is None:
            if proc.stdin is not None:
                proc.stdin.close()  # the remote command ends; ssh follows
            for stop in (proc.terminate, proc.kill):
                try:
                    await asyncio.wait_for(proc.wait(), STOP_GRACE)
                    break
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        stop()
            else:
                await proc.wait()
        self._remove_files()

    def _remove_files(self) -> None:
        for path in (self._known_hosts, self._log_path, self.dial_socket, self.control_socket):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _private(path: Path) -> BinaryIO:
    """PATH emptied and opened for writing, readable by the coordinator's user alone
    (as everything in its state folder)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an older file may have had another mode
    return os.fdopen(fd, "wb")


def _key_only(host_key_line: str) -> str:
    """`TYPE BASE64` of a public key line (its comment dropped)."""
    return " ".join(host_key_line.split()[:2])


def _key_args(identity_file: str, extra_keys: list[Path]) -> list[str]:
    # As the asyncssh connection does: with an identity file exactly that key, no
    # agent; without, the user's agent and ~/.ssh/id_* (ssh's defaults) plus ours.
    if identity_file:
        return ["-i", identity_file, "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none"]
    args: list[str] = []
    for key in extra_keys:
        args += ["-i", str(key)]
    return args


def _accepts(path: Path) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True
