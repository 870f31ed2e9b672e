"""A real OpenSSH sshd on a loopback address, for tests.

    server = SshServer.start(tmp_path)          # 127.0.0.2, a free high port
    try:
        ...connect to server.host:server.port as server.user with
        server.client_key_path, pinning server.host_public_key()...
    finally:
        server.stop()

Everything the server needs (host key, client key pair, authorized_keys,
sshd_config, pid file, log) lives in ``root``. sshd must be started by root
(privilege separation) and needs ``/run/sshd``, created here if missing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

SSHD = Path("/usr/sbin/sshd")
SSH_KEYGEN = "ssh-keygen"
PRIVSEP_DIR = Path("/run/sshd")
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
# Taken on the project's machines (see shared ENGINES.md).
RESERVED_PORTS = frozenset({2222})


class SshServerError(RuntimeError):
    """sshd could not be set up or did not come up."""


def _public_half(private_key: Path) -> Path:
    return private_key.with_name(private_key.name + ".pub")


def _keygen(path: Path, comment: str) -> None:
    """Write a fresh ed25519 key pair to ``path`` and ``path.pub``."""
    path.unlink(missing_ok=True)
    _public_half(path).unlink(missing_ok=True)
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
    )


def _free_port(host: str) -> int:
    """A port on ``host`` that is free right now (the kernel's choice)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port: int = sock.getsockname()[1]
        if port not in RESERVED_PORTS:
            return port


def _accepts_tcp(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state letter), from /proc."""
    table: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may contain spaces and parentheses.
        state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
        table[int(entry.name)] = (int(ppid), state)
    return table


def _kill_descendants(pid: int, timeout: float) -> None:
    """SIGKILL every process below ``pid``, leaves first, letting each parent
    reap its children before it dies itself (else they linger as zombies).

    sshd's per-connection processes and what their sessions run each sit in
    a session of their own, so no process group covers them.
    """
    deadline = time.monotonic() + timeout
    while True:
        table = _process_table()
        below: set[int] = set()
        frontier = [pid]
        while frontier:
            parent = frontier.pop()
            children = [child for child, (ppid, _) in table.items() if ppid == parent]
            below.update(children)
            frontier.extend(children)
        if not below or time.monotonic() >= deadline:
            return
        parents = {table[child][0] for child in below}
        for leaf in below - parents:
            if table[leaf][1] != "Z":  # a zombie only waits for its parent to reap it
                with contextlib.suppress(ProcessLookupError):
                    os.kill(leaf, signal.SIGKILL)
        time.sleep(0.02)


class SshServer:
    """A running ``sshd -D`` listening on ``host:port`` only."""

    user = "root"

    def __init__(self, root: Path, host: str, port: int) -> None:
        self.root = root.resolve()
        self.host = host
        self.port = port
        self.host_key_path = self.root / "ssh_host_ed25519_key"
        self.client_key_path = self.root / "client_ed25519"
        self.authorized_keys_path = self.root / "authorized_keys"
        self.config_path = self.root / "sshd_config"
        self.pid_path = self.root / "sshd.pid"
        self.log_path = self.root / "sshd.log"
        self._process: subprocess.Popen[bytes] | None = None
        # Also passwords, and each user's own ~/.ssh/authorized_keys (key installs).
        self.password_auth = False
        # Set in every session (sshd's SetEnv, after its own HOME and PATH): a node
        # user with a fresh HOME, or a PATH without (or with a fake) python3.
        self.session_env: dict[str, str] = {}

    # -- lifecycle ---------------------------------------------------------

    @classmethod
    def start(
        cls,
        root: Path,
        host: str = "127.0.0.2",
        port: int | None = None,
        password_auth: bool = False,
        session_env: dict[str, str] | None = None,
    ) -> SshServer:
        """Generate keys and config in ``root`` and start sshd on ``host:port``.

        With ``port=None`` a free high port is picked (retried if another
        process grabs it before sshd binds it).
        """
        if os.geteuid() != 0:
            raise SshServerError("sshd must be started by root")
        if not SSHD.is_file():
            raise SshServerError(f"{SSHD} not found: install openssh-server (scripts/setup.sh)")
        if port in RESERVED_PORTS:
            raise SshServerError(f"port {port} is reserved on these machines; pick another")
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        root.mkdir(parents=True, exist_ok=True)

        server = cls(root, host, port if port is not None else _free_port(host))
        server.password_auth = password_auth
        server.session_env = dict(session_env or {})
        _keygen(server.host_key_path, f"vendetta-test-host@{host}")
        _keygen(server.client_key_path, "vendetta-test-client")
        server.authorized_keys_path.write_text(server.client_public_key() + "\n")

        attempts = 1 if port is not None else 3
        for attempt in range(1, attempts + 1):
            server._write_config()
            try:
                server._launch()
                return server
            except SshServerError:
                if attempt == attempts:
                    raise
                server.port = _free_port(host)
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """Stop the listener and every connection it serves; wait for them."""
        process = self._process
        if process is None:
            return
        self.thaw()  # a frozen sshd would not die of SIGTERM
        self.kill_connections()
        self._process = None
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def kill_connections(self) -> None:
        """Drop every open connection and what its sessions run (the listener keeps running)."""
        if self._process is None:
            return
        _kill_descendants(self._process.pid, STOP_TIMEOUT)

    def freeze(self) -> None:
        """Make the node silent: sshd and every connection it serves stop answering
        (SIGSTOP), while their TCP connections stay open, as when a network drops the
        traffic. New connections are queued by the kernel, unanswered. ``thaw`` undoes it."""
        self._signal_all(signal.SIGSTOP)

    def thaw(self) -> None:
        """Let a frozen sshd and its connections run again (SIGCONT)."""
        self._signal_all(signal.SIGCONT)

    def _signal_all(self, sig: signal.Signals) -> None:
        if self._process is None:
            return
        table = _process_table()
        pids, frontier = {self._process.pid}, [self._process.pid]
        while frontier:
            parent = frontier.pop()
            children = [child for child, (ppid, _) in table.items() if ppid == parent]
            pids.update(children)
            frontier.extend(children)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def restart(self) -> None:
        """Start a stopped server again on the same host:port with the same keys."""
        if self._process is None:
            self._launch()

    def rotate_host_key(self, *, drop_connections: bool = False) -> None:
        """Give the server a NEW host key and restart it on the same host:port.

        Open connections survive, as with a real sshd restart, unless
        ``drop_connections`` is true.
        """
        if drop_connections:
            self.kill_connections()
        process = self._process
        if process is not None:
            self._process = None
            process.terminate()
            process.wait(timeout=STOP_TIMEOUT)
        _keygen(self.host_key_path, f"vendetta-test-host@{self.host}")
        self._launch()

    def __enter__(self) -> SshServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- keys --------------------------------------------------------------

    def host_public_key(self) -> str:
        """The host key as an OpenSSH public key line (``ssh-ed25519 AAAA... comment``)."""
        return _public_half(self.host_key_path).read_text().strip()

    def host_fingerprint(self) -> str:
        """The host key's fingerprint as ``ssh-keygen -lf`` prints it: ``SHA256:...``."""
        out = subprocess.run(
            [SSH_KEYGEN, "-l", "-E", "sha256", "-f", str(_public_half(self.host_key_path))],
            check=True,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        ).stdout
        return out.split()[1]

    def client_public_key(self) -> str:
        """The public half of ``client_key_path``, an OpenSSH public key line."""
        return _public_half(self.client_key_path).read_text().strip()

    def authorize(self, pubkey_line: str) -> None:
        """Let one more client key in (sshd rereads authorized_keys per login)."""
        line = pubkey_line.strip()
        if not line or "\n" in line:
            raise ValueError("expected exactly one OpenSSH public key line")
        with self.authorized_keys_path.open("a") as f:
            f.write(line + "\n")

    # -- internals ---------------------------------------------------------

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def _write_config(self) -> None:
        def q(path: Path) -> str:
            return f'"{path}"'

        self.config_path.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    f"ListenAddress {self.host}",
                    f"HostKey {q(self.host_key_path)}",
                    f"PidFile {q(self.pid_path)}",
                    f"AuthorizedKeysFile {q(self.authorized_keys_path)}"
                    + (" .ssh/authorized_keys" if self.password_auth else ""),
                    "PubkeyAuthentication yes",
                    f"PasswordAuthentication {'yes' if self.password_auth else 'no'}",
                    "KbdInteractiveAuthentication no",
                    f"PermitRootLogin {'yes' if self.password_auth else 'prohibit-password'}",
                    "StrictModes no",
                    "UsePAM no",
                    "AllowTcpForwarding yes",
                    "AllowStreamLocalForwarding yes",
                    "StreamLocalBindUnlink yes",
                    "PermitUserEnvironment no",
                    "LogLevel VERBOSE",
                    "Subsystem sftp internal-sftp",
                    *(f'SetEnv "{k}={v}"' for k, v in self.session_env.items()),
                    "",
                ]
            )
        )

    def _logged_listening(self, offset: int) -> bool:
        with self.log_path.open("rb") as log:
            log.seek(offset)
            return b"Server listening on" in log.read()

    def _launch(self) -> None:
        """Start sshd with the current config and wait until it accepts TCP."""
        with self.log_path.open("ab") as log:
            log_start = log.tell()
            process = subprocess.Popen(
                [str(SSHD), "-D", "-e", "-f", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + START_TIMEOUT
        # "Server listening" in this run's part of the log tells our sshd bound
        # the port (the TCP check alone could reach some other listener).
        while not (self._logged_listening(log_start) and _accepts_tcp(self.host, self.port)):
            code = process.poll()
            if code is not None:
                raise SshServerError(
                    f"sshd on {self.host}:{self.port} exited with {code}; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            if time.monotonic() >= deadline:
                process.kill()
                process.wait()
                raise SshServerError(
                    f"sshd on {self.host}:{self.port} did not accept TCP within "
                    f"{START_TIMEOUT:.0f}s; log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.05)
        self._process = process
