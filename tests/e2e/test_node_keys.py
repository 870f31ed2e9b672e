"""`node add` on a node that knows only the user's password: with no SSH key on
our side, vendetta makes one, installs it once with the password (read from
stdin here, never from argv), and from then on reaches the node with the key.

Runs against a real sshd that accepts passwords. The node's user is a second
name for uid 0 with a home, password and authorized_keys of its own: the agent
it starts drives the engines as root, like every test node here, and the
test's Python may live where other users cannot run it (pyenv under /root).
"""

from __future__ import annotations

import os
import pwd
import secrets
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cli import BIN, Env, cli_env
from tests.support.sshd import SshServer

pytestmark = [pytest.mark.e2e, pytest.mark.sshd]

USER = "vd-keytest"


def _set_password(password: str) -> None:
    subprocess.run(["chpasswd"], input=f"{USER}:{password}\n", text=True, check=True)


@pytest.fixture(scope="module")
def user() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("creating a test user needs root")

    def remove() -> None:
        # -f: uid 0 always has processes; only this name's entries and home go.
        subprocess.run(["userdel", "-f", "-r", USER], capture_output=True, check=False)

    remove()
    subprocess.run(
        ["useradd", "-o", "-u", "0", "-g", "0", "-m", "-d", f"/home/{USER}", "-s", "/bin/sh", USER],
        check=True,
        capture_output=True,
    )
    home = Path(pwd.getpwnam(USER).pw_dir)
    try:
        yield home
    finally:
        remove()


@pytest.fixture(scope="module")
def env(user: Path) -> Iterator[Env]:
    with cli_env(prefix="vd-keys-") as e:
        # A user with no key anywhere: no ~/.ssh/id_*, no ssh-agent.
        fake_home = e.home / "user-home"
        fake_home.mkdir()
        e.env["HOME"] = str(fake_home)
        e.env.pop("SSH_AUTH_SOCK", None)
        e.nodes["pw"] = SshServer.start(e.home / "sshd", host="127.0.0.9", password_auth=True)
        e.cli("server", "start")
        yield e
        subprocess.run(
            [str(BIN / "vendetta-agent"), "--dir", str(user / "agent"), "stop"],
            capture_output=True,
            check=False,
        )


def _add(e: Env, user: Path, *extra: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    server = e.nodes["pw"]
    agent = f"{BIN / 'vendetta-agent'} --dir {user / 'agent'}"
    where = [server.host, "--port", str(server.port), "--user", USER]
    return subprocess.run(
        [
            str(BIN / "vendetta"),
            "node",
            "add",
            "pw",
            *where,
            "--yes",
            "--agent-command",
            agent,
            *extra,
        ],
        input=stdin,
        env=e.env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_password_installs_a_generated_key_then_the_key_is_used(env: Env, user: Path) -> None:
    password = secrets.token_urlsafe(12)
    _set_password(password)
    vendetta_key = Path(env.env["VENDETTA_HOME"]) / "ssh" / "id_ed25519"

    # No key accepted and no --password: a clear error naming the key to install.
    refused = _add(env, user)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "--password" in refused.stderr
    public = (vendetta_key.parent / "id_ed25519.pub").read_text().strip()
    assert oct(vendetta_key.stat().st_mode & 0o777) == "0o600"
    assert public.split()[1] in " ".join(refused.stderr.split())
    assert "pw" not in {n["name"] for n in env.json("node", "list")}

    # No password on stdin: said, nothing recorded.
    empty = _add(env, user, "--password", stdin="")
    assert empty.returncode == 1 and "no password given" in empty.stderr, empty.stderr

    # A wrong password: refused, nothing recorded, nothing installed.
    wrong = _add(env, user, "--password", stdin="not-the-password\n")
    assert wrong.returncode == 1 and "refused the password" in wrong.stderr, wrong.stderr
    assert "pw" not in {n["name"] for n in env.json("node", "list")}
    assert not (user / ".ssh" / "authorized_keys").exists()

    # The password (on stdin: never in argv) installs the key once.
    added = _add(env, user, "--password", stdin=password + "\n")
    assert added.returncode == 0, added.stderr
    assert "Key installed" in added.stderr
    assert password not in added.stdout + added.stderr
    authorized = (user / ".ssh" / "authorized_keys").read_text().splitlines()
    assert authorized == [public]
    assert env.wait_node("pw", "ready")["user"] == USER

    # From now on the key alone: the password no longer works, the node still does,
    # including after its SSH connection is cut (a fresh login).
    _set_password(secrets.token_urlsafe(12))
    server = env.nodes["pw"]

    def logins(method: str) -> int:
        return server.log_path.read_text().count(f"Accepted {method} for {USER}")

    assert logins("password") == 1 and logins("publickey") >= 1
    before = logins("publickey")
    server.kill_connections()
    deadline = time.monotonic() + 60
    while logins("publickey") == before:
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.2)
    env.wait_node("pw", "ready")
    env.cli("node", "test", "pw")
    assert logins("password") == 1


def _files(*roots: Path) -> list[Path]:
    return [p for root in roots if root.exists() for p in root.rglob("*") if not p.is_symlink()]


def test_state_is_private_and_holds_no_secret(env: Env, user: Path) -> None:
    """After a password was used, a key made and a node run: no file of the
    coordinator or the agent is readable by others, and neither the password nor
    the private key appears in any file, log or `--json` output but the key's own."""
    password = secrets.token_urlsafe(12)
    _set_password(password)
    if "pw" in {n["name"] for n in env.json("node", "list")}:
        env.cli("node", "remove", "pw", "--force")
    (user / ".ssh" / "authorized_keys").unlink(missing_ok=True)
    added = _add(env, user, "--password", stdin=password + "\n")
    assert added.returncode == 0, added.stderr
    env.wait_node("pw", "ready")

    home = Path(env.env["VENDETTA_HOME"])
    key = home / "ssh" / "id_ed25519"
    # The body's first line is the same in every ed25519 key (format, cipher, type).
    key_lines = [line for line in key.read_text().splitlines() if "PRIVATE KEY" not in line][1:]
    shown = added.stdout + added.stderr
    # Their verdicts do not matter here (a row may fail), only what they print.
    for args in (
        ("node", "list", "--json"),
        ("node", "test", "pw", "--json"),
        ("node", "test", "pw"),
    ):
        run = env.cli(*args, check=False)
        shown += run.stdout + run.stderr
    shown += env.cli("cluster", "status", "--json", check=False).stdout

    leaks: list[str] = []
    loose: list[str] = []
    for path in _files(home, user / "agent"):
        try:
            st = path.stat()
        except FileNotFoundError:  # a command's FIFO, removed once both ends held it
            continue
        mode = st.st_mode & 0o777
        # A container's FIFO folder is 0711 for the container's users, inside the
        # agent's 0700 io/ that no one else on the node may enter (fifo_pipes); the
        # FIFOs being opened there are 0666 for whichever user the image runs as.
        fifo_folder = path.is_dir() and path.parent.name == "io" and mode == 0o711
        fifo = stat.S_ISFIFO(st.st_mode) and path.parent.parent.name == "io"
        if mode & 0o077 and not (fifo_folder or fifo):
            loose.append(f"{path} {oct(mode)}")
        if path.is_file() and path != key:
            data = path.read_bytes()
            if password.encode() in data or any(k.encode() in data for k in key_lines):
                leaks.append(str(path))
    assert not loose, f"readable by others: {loose}"
    assert not leaks, f"a secret is written in: {leaks}"
    assert password not in shown
    assert not any(k in shown for k in key_lines)
