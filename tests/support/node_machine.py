"""A node that is a machine of its own: an LXD system container with sshd and python3.

    machine = NodeMachine.launch(root)          # root: a folder for its client key
    try:
        ...connect to machine.host:machine.port as machine.user (root, or
        NODE_USER) with machine.client_key_path, pinning machine.host_public_key()...
    finally:
        machine.stop()

The container runs the image scripts/build-node-image.sh makes (Debian 12
minbase: sshd, python3, python3-venv, iproute2; nothing of vendetta) with no
network at all: its sshd is reached through an LXD proxy device that listens
on 127.0.0.1 on this machine, so test traffic stays on loopback and the node
reaches no package index. ``user`` and ``client_key_path`` match
``tests.support.sshd.SshServer``, so ``Env.add_node`` takes either.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
import uuid
from pathlib import Path

from tests.support.sshd import _free_port, _keygen, _public_half

IMAGE = "vendetta/node-debian12"
NODE_USER = "vdnode"
START_TIMEOUT = 30.0


class NodeMachineError(RuntimeError):
    """The node container could not be launched or its sshd did not answer."""


def _lxc(*args: str, input: bytes | None = None, check: bool = True) -> str:
    proc = subprocess.run(
        ["lxc", *args], input=input, capture_output=True, timeout=120, check=False
    )
    if check and proc.returncode != 0:
        raise NodeMachineError(
            f"lxc {' '.join(args)} exited {proc.returncode}: {proc.stderr.decode(errors='replace')}"
        )
    return proc.stdout.decode(errors="replace")


def image_problem(image: str = IMAGE, script: str = "build-node-image.sh") -> str:
    """Why the node image is not there ("" if it is)."""
    proc = subprocess.run(
        ["lxc", "image", "info", image], capture_output=True, text=True, timeout=30, check=False
    )
    if proc.returncode != 0:
        return f"LXD image {image} missing (bash scripts/{script})"
    return ""


def _answers_ssh(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0) as sock:
            sock.settimeout(2.0)
            return sock.recv(64).startswith(b"SSH-2.0-")
    except OSError:
        return False


class NodeMachine:
    """A running node container and the loopback port its sshd answers on."""

    host = "127.0.0.1"

    def __init__(self, root: Path, name: str, user: str, image: str = IMAGE) -> None:
        self.root = root
        self.image = image
        self.name = name
        self.user = user
        self.port = 0
        self.client_key_path = root / "node_client_ed25519"
        self._host_key = ""

    @classmethod
    def launch(cls, root: Path, user: str = "root", image: str = IMAGE) -> NodeMachine:
        """Launch a node container, give root and NODE_USER the client key, forward its sshd."""
        root.mkdir(parents=True, exist_ok=True)
        machine = cls(root, f"vd-node-{uuid.uuid4().hex[:8]}", user, image)
        try:
            machine._start()
        except BaseException:
            machine.stop()
            raise
        return machine

    def _start(self) -> None:
        _keygen(self.client_key_path, "vendetta-test-client")
        key = _public_half(self.client_key_path).read_bytes()
        _lxc("launch", self.image, self.name)
        uid = self.exec("id", "-u", NODE_USER).strip()
        for home, owner in (("/root", "0"), (f"/home/{NODE_USER}", uid)):
            _lxc(
                "file", "push", "-", f"{self.name}{home}/.ssh/authorized_keys",
                "--uid", owner, "--gid", owner, "--mode", "0600", input=key,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while not self._host_key:
            out = subprocess.run(
                ["lxc", "exec", self.name, "--", "cat", "/etc/ssh/ssh_host_ed25519_key.pub"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            if out.returncode == 0 and out.stdout.strip():
                self._host_key = out.stdout.strip()
            elif time.monotonic() > deadline:
                raise NodeMachineError(f"{self.name} made no host key in {START_TIMEOUT:.0f}s")
            else:
                time.sleep(0.1)
        for _attempt in range(3):  # the port may be taken between picking and listening
            port = _free_port(self.host)
            added = subprocess.run(
                ["lxc", "config", "device", "add", self.name, "ssh", "proxy",
                 f"listen=tcp:{self.host}:{port}", "connect=tcp:127.0.0.1:22", "bind=host"],
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            if added.returncode == 0:
                self.port = port
                break
        else:
            raise NodeMachineError(f"no proxy device for {self.name}: {added.stderr}")
        while not _answers_ssh(self.host, self.port):
            if time.monotonic() > deadline:
                raise NodeMachineError(f"sshd of {self.name} not answering on {self.port}")
            time.sleep(0.1)

    def host_public_key(self) -> str:
        """The node's host key as an OpenSSH public key line (pin it)."""
        return self._host_key

    def exec(self, *argv: str) -> str:
        """Run ``argv`` in the node as root, not over SSH (for setup and checks)."""
        return _lxc("exec", self.name, "--", *argv)

    def stop(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, NodeMachineError):
            _lxc("delete", "--force", self.name, check=False)
