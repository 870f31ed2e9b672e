"""One long-lived asyncssh connection per node, forwarding a private local
unix socket to the agent's unix socket on the node.

Host keys are always verified against the key pinned at `node add`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shlex
import time
from pathlib import Path, PurePosixPath

import asyncssh
import grpc.aio
from asyncssh.public_key import load_default_keypairs

from common.errors import (
    FailedPreconditionError,
    HostKeyMismatchError,
    NodeUnreachableError,
    PermissionDeniedError,
    VendettaError,
)
from common.paths import DIAL_SOCKET, vendetta_home
from common.socket_paths import tunnel_socket
from common.version import build_id
from coordinator.ssh_keys import read_identity
from coordinator.transports import openssh_tunnel, ssh_install
from coordinator.transports.base import CHANNEL_OPTIONS, Forward, Transport

log = logging.getLogger("vendetta.coordinator")

CONNECT_TIMEOUT = 15.0
# Seconds a closing connection may take to say goodbye before it is aborted.
CLOSE_TIMEOUT = 2.0
# Fastest cipher measured for bulk through a forward; the rest as asyncssh orders them.
_ENCRYPTION = [
    "aes128-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes256-gcm@openssh.com",
    "aes128-ctr",
    "aes256-ctr",
]


async def scan_host_key(address: str, port: int) -> asyncssh.SSHKey:
    """The host key ``address:port`` presents (to show its fingerprint before pinning)."""
    try:
        key = await asyncio.wait_for(
            asyncssh.get_server_host_key(address, port), timeout=CONNECT_TIMEOUT
        )
    except (OSError, asyncssh.Error, TimeoutError) as exc:
        raise NodeUnreachableError(
            f"cannot reach {address}:{port} over SSH: {_why(exc)}; check the address and port "
            "and that sshd runs there"
        ) from exc
    if key is None:
        raise NodeUnreachableError(f"{address}:{port} presented no host key")
    return key


def fingerprint(public_key_line: str) -> str:
    return str(asyncssh.import_public_key(public_key_line).get_fingerprint("sha256"))


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, asyncssh.Error):
        return exc.reason or type(exc).__name__
    return str(exc) or type(exc).__name__


class SshTransport(Transport):
    kind = "ssh"

    def __init__(
        self,
        node: str,
        address: str,
        port: int,
        user: str,
        host_key: str,
        tunnel_dir: Path,
        identity_file: str = "",
        agent_command: list[str] | None = None,
        vendetta_key: Path | None = None,
        bundles_dir: Path | None = None,
    ) -> None:
        self.node = node
        self.address = address
        self.port = port
        self.user = user
        self.host_key = asyncssh.import_public_key(host_key)
        self.identity_file = identity_file
        self.vendetta_key = vendetta_key
        # An explicit command: vendetta is installed on the node by hand (tests use this
        # checkout's venv). None: the coordinator installs its own build's agent there.
        self.agent_command = agent_command or None
        self.bundles_dir = bundles_dir or vendetta_home() / "bundles"
        # How the agent was run at the last connect (the installed one, or agent_command).
        self.running_agent: list[str] | None = self.agent_command
        # The agent's state folder on the node, as its `ensure` said at the last connect.
        self.agent_state: str | None = None
        # How the agent runs there (a systemd --user unit or detached), as `ensure` said.
        self.agent_run_as = ""
        # Always short enough for a unix socket, whatever $HOME or the name (63 chars).
        self.local_socket = tunnel_socket(tunnel_dir, node)
        self._conn: asyncssh.SSHClientConnection | None = None
        self._listener: asyncssh.SSHListener | None = None
        self._tunnel: openssh_tunnel.OpenSshTunnel | None = None
        self._channel: grpc.aio.Channel | None = None

    async def connect(self) -> grpc.aio.Channel:
        await self.close()
        conn = await self._open_ssh()
        try:
            remote_socket = await self._ensure_agent(conn)
            await self._open_tunnel(conn, remote_socket)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._channel = grpc.aio.insecure_channel(
            f"unix:{self.local_socket}", options=CHANNEL_OPTIONS
        )
        return self._channel

    async def _open_tunnel(self, conn: asyncssh.SSHClientConnection, remote_socket: str) -> None:
        """The local socket to the agent's: OpenSSH's `ssh -L` in a child where it comes
        up (openssh_tunnel.py), asyncssh's forward in this process where it does not."""
        if openssh_tunnel.wanted():
            vendetta_key = self.vendetta_key
            try:
                self._tunnel = await openssh_tunnel.OpenSshTunnel.start(
                    node=self.node,
                    address=self.address,
                    port=self.port,
                    user=self.user,
                    host_key_line=self.host_key.export_public_key().decode(),
                    identity_file=self.identity_file,
                    extra_keys=[vendetta_key] if vendetta_key and vendetta_key.is_file() else [],
                    local_socket=self.local_socket,
                    remote_socket=remote_socket,
                    remote_dial_socket=str(PurePosixPath(remote_socket).with_name(DIAL_SOCKET)),
                )
                return
            except (openssh_tunnel.TunnelNotStarted, OSError) as exc:
                log.warning(
                    "node %s: the tunnel stays in the coordinator (slower): %s", self.node, exc
                )
        with contextlib.suppress(FileNotFoundError):
            self.local_socket.unlink()
        self._listener = await conn.forward_local_path(str(self.local_socket), remote_socket)
        self.local_socket.chmod(0o600)

    def dial_socket(self) -> Path | None:
        """The OpenSSH child's forward to the agent's dial socket; none when asyncssh
        carries the tunnel (its bytes would be the coordinator's again)."""
        return self._tunnel.dial_socket if self._tunnel is not None else None

    def control_socket(self) -> Path | None:
        """The OpenSSH child's ControlPath (cli/tunnel_master.py); none with asyncssh."""
        return self._tunnel.control_socket if self._tunnel is not None else None

    @property
    def tunnel_pid(self) -> int | None:
        """The OpenSSH child carrying the tunnel; None when asyncssh carries it."""
        return self._tunnel.pid if self._tunnel is not None else None

    @property
    def where(self) -> str:
        who = f"{self.user}@" if self.user else ""
        return f"node {self.node!r} ({who}{self.address}:{self.port})"

    def _key_options(self) -> dict[str, object]:
        # With --identity: exactly that key, no agent keys on top. Without: ssh-agent
        # and the default ~/.ssh/id_* keys, as ssh(1) does, plus vendetta's own key.
        if self.identity_file:
            return {"client_keys": [read_identity(self.identity_file)], "agent_path": None}
        keys = list(load_default_keypairs())
        if self.vendetta_key is not None and self.vendetta_key.is_file():
            keys += asyncssh.load_keypairs([self.vendetta_key], ignore_encrypted=True)
        return {"client_keys": keys}

    def _options(self, **auth: object) -> asyncssh.SSHClientConnectionOptions:
        return asyncssh.SSHClientConnectionOptions(
            known_hosts=([self.host_key], [], []),
            username=self.user or None,
            encryption_algs=_ENCRYPTION,
            keepalive_interval=10,
            keepalive_count_max=3,
            connect_timeout=CONNECT_TIMEOUT,
            **auth,
        )

    async def _open_ssh(self) -> asyncssh.SSHClientConnection:
        try:
            keys = await asyncio.to_thread(self._key_options)  # reads key files
            return await self._connect(self._options(**keys))
        except asyncssh.PermissionDenied as exc:
            key = self.identity_file or "your SSH keys (ssh-agent, ~/.ssh/id_*, vendetta's own)"
            raise PermissionDeniedError(
                f"{self.where} refused SSH authentication with {key}: add the public key to "
                f"~{self.user or ''}/.ssh/authorized_keys on the node, or add the node with "
                "`--password` to install it with the node's password once"
            ) from exc

    async def _connect(
        self, options: asyncssh.SSHClientConnectionOptions
    ) -> asyncssh.SSHClientConnection:
        """Connect with the pinned host key; a changed key or no route is a clear error."""
        try:
            return await asyncssh.connect(self.address, self.port, options=options)
        except asyncssh.HostKeyNotVerifiable as exc:
            pinned = self.host_key.get_fingerprint("sha256")
            try:
                now = (await scan_host_key(self.address, self.port)).get_fingerprint("sha256")
            except VendettaError:
                now = "(could not read it)"
            raise HostKeyMismatchError(
                f"the SSH host key of {self.where} has changed: pinned {pinned}, the node now "
                f"presents {now}. Refusing to connect: this can be an attack. If the node was "
                f"reinstalled, check the new key, then trust it deliberately with "
                f"`vendetta node trust {self.node}`"
            ) from exc
        except asyncssh.PermissionDenied:
            raise
        except (OSError, asyncssh.Error, TimeoutError) as exc:
            raise NodeUnreachableError(
                f"cannot reach {self.where}: {_why(exc)}; check that the node is up and sshd "
                f"listens on port {self.port}"
            ) from exc

    async def probe_connect(self) -> float:
        """Seconds to open a fresh SSH connection to the node, closed again (`node test`):
        the host key is checked against the pinned one, then the user authenticates. The
        error tree as for a connect (HostKeyMismatchError, PermissionDeniedError, ...)."""
        t0 = time.perf_counter()
        conn = await self._open_ssh()
        elapsed = time.perf_counter() - t0
        conn.close()
        with contextlib.suppress(Exception):
            await conn.wait_closed()
        return elapsed

    async def install_key(self, password: str, public_key_line: str) -> None:
        """Log in once with ``password`` and add the key to the user's authorized_keys."""
        options = self._options(
            password=password,
            client_keys=None,
            agent_path=None,
            preferred_auth=("keyboard-interactive", "password"),
        )
        try:
            conn = await self._connect(options)
        except asyncssh.PermissionDenied as exc:
            raise PermissionDeniedError(
                f"{self.where} refused the password (or does not allow password logins): "
                "check it, or install the key yourself"
            ) from exc
        key = shlex.quote(public_key_line)
        script = (
            "umask 077 && mkdir -p ~/.ssh && touch ~/.ssh/authorized_keys && "
            f"{{ grep -qxF {key} ~/.ssh/authorized_keys || "
            f"printf '%s\\n' {key} >> ~/.ssh/authorized_keys; }}"
        )
        try:
            result = await conn.run(script, check=False, timeout=30)
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            raise NodeUnreachableError(
                f"{self.where}: installing the key failed: {_why(exc)}"
            ) from exc
        finally:
            conn.close()
        if result.exit_status != 0:
            raise FailedPreconditionError(
                f"{self.where}: could not add the key to ~/.ssh/authorized_keys: "
                f"{str(result.stderr or result.stdout).strip()[-400:]}"
            )

    async def _ensure_agent(self, conn: asyncssh.SSHClientConnection) -> str:
        if self.agent_command is not None:
            return await self._run_ensure(conn, self.agent_command)
        agent = await ssh_install.ensure_installed(conn, self.node, self.bundles_dir)
        self.running_agent = agent
        socket = await self._run_ensure(conn, agent)
        await ssh_install.prune(conn, self.node, agent)
        return socket

    async def _run_ensure(self, conn: asyncssh.SSHClientConnection, agent: list[str]) -> str:
        command = shlex.join([*agent, "ensure"])
        try:
            result = await conn.run(command, check=False, timeout=60)
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            raise NodeUnreachableError(
                f"node {self.node!r}: starting the agent failed: {_why(exc)}"
            ) from exc
        out = str(result.stdout or "").strip()
        if result.exit_status != 0:
            err = str(result.stderr or "").strip()[-800:]
            hint = ""
            if result.exit_status == 127:
                hint = " (is vendetta installed on the node and on the PATH of SSH sessions?)"
            raise FailedPreconditionError(
                f"node {self.node!r}: could not start the node agent with `{command}`: "
                f"exit {result.exit_status}{hint}: {err or out}"
            )
        try:
            status = json.loads(out.splitlines()[-1])
            socket, version = str(status["socket"]), str(status["version"])
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise FailedPreconditionError(
                f"node {self.node!r}: the agent's `ensure` printed something unexpected: {out!r}"
            ) from exc
        if version != build_id():
            if self.agent_command is None:  # the installed build runs: anything else is a bug
                raise FailedPreconditionError(
                    f"node {self.node!r}: the agent runs build {version}, not the "
                    f"coordinator's {build_id()}, after installing it; this is a bug"
                )
            log.warning(
                "node %s: the agent installed by hand (%s) is build %s, the coordinator is "
                "%s: upgrade vendetta on the node, or add the node without --agent-command "
                "so the coordinator installs its own",
                self.node,
                command,
                version,
                build_id(),
            )
        self.agent_state = str(PurePosixPath(socket).parent)
        self.agent_run_as = str(status.get("run_as") or "")  # "" from an older agent
        if status.get("started") and self.agent_run_as:
            log.info("node %s: agent started as a %s", self.node, self.agent_run_as)
        return socket

    async def stop_agent(self, purge: bool = False) -> None:
        """Stop the agent with its own `stop` over the connection (one of its own if the
        node is not connected now); with ``purge`` remove its installs and state too."""
        conn, opened = self._conn, None
        if conn is None:
            conn = opened = await self._open_ssh()
        try:
            await ssh_install.stop(conn, self.node, self.running_agent)
            if purge:
                await ssh_install.purge(conn, self.node, self.agent_state)
        finally:
            if opened is not None:
                opened.close()

    async def wait_closed(self) -> None:
        """Until the connection ends, or the OpenSSH child carrying the tunnel does."""
        waits = []
        if self._conn is not None:
            waits.append(asyncio.ensure_future(self._conn.wait_closed()))
        if self._tunnel is not None:
            waits.append(asyncio.ensure_future(self._tunnel.wait()))
        if not waits:
            return
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def forward(self, listen_port: int, dest_host: str, dest_port: int) -> Forward:
        if self._conn is None:
            raise NodeUnreachableError(f"node {self.node!r} is not connected")
        listener = await self._conn.forward_local_port(
            "127.0.0.1", listen_port, dest_host, dest_port
        )
        return _SshForward(listener)

    def drop_connection(self) -> None:
        """Abort the SSH connection (tests and `node test` use it to prove reconnects)."""
        if self._conn is not None:
            self._conn.abort()
        if self._tunnel is not None:
            self._tunnel.kill()

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(None)
            self._channel = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._tunnel is not None:
            await self._tunnel.close()
            self._tunnel = None
        if self._conn is not None:
            self._conn.close()
            # A silent peer never lets a graceful close finish (unsent data waits for it).
            try:
                await asyncio.wait_for(self._conn.wait_closed(), CLOSE_TIMEOUT)
            except TimeoutError:
                self._conn.abort()
            except Exception:  # closing a broken connection: nothing more to say
                log.debug("node %s: closing the SSH connection failed", self.node, exc_info=True)
            self._conn = None
        with contextlib.suppress(FileNotFoundError):
            self.local_socket.unlink()


class _SshForward:
    def __init__(self, listener: asyncssh.SSHListener) -> None:
        self._listener = listener

    @property
    def port(self) -> int:
        return int(self._listener.get_port())

    def close(self) -> None:
        self._listener.close()
