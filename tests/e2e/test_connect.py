"""`workspace connect` through coordinator and agent on a node reached over a
real sshd: a command's output and exit code, and an interactive terminal
driven through tmux (a real PTY on our side): typing, output, resize, exit.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.conftest import IN_CI, TEST_IMAGE
from tests.support.cli import BIN, Env, cli_env, wait_for
from tests.support.sshd import SshServer

pytestmark = [pytest.mark.e2e, pytest.mark.docker, pytest.mark.sshd]


@pytest.fixture(scope="module")
def remote() -> Iterator[Env]:
    with cli_env(prefix="vd-conn-") as e:
        e.nodes["n1"] = SshServer.start(e.home / "sshd", host="127.0.0.8")
        e.cli("server", "start")
        e.add_node("n1", e.nodes["n1"])
        cfg = e.home / "p" / ".vendetta" / "config.yaml"
        cfg.parent.mkdir(parents=True)
        cfg.write_text(f"name: p\ndocker: {{image: '{TEST_IMAGE}'}}\n")
        e.cli("workspace", "create", "term", "--remote", "n1", "--config", str(cfg))
        e.cli("workspace", "up", "term")
        yield e


def test_command_output_and_exit_code(remote: Env) -> None:
    run = remote.cli(
        "workspace",
        "connect",
        "term",
        "--",
        "sh",
        "-c",
        "echo out-$((3*4)); echo err >&2; exit 7",
        check=False,
    )
    assert (run.stdout, run.stderr, run.returncode) == ("out-12\n", "err\n", 7)


def test_a_command_reads_piped_stdin(remote: Env, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024)  # binary, and more than a few messages
    source = tmp_path / "upload.bin"
    source.write_bytes(data)
    with source.open("rb") as stdin:
        run = subprocess.run(
            [str(BIN / "vendetta"), "workspace", "connect", "term", "--", "sh", "-c",
             "cat > /tmp/upload.bin; md5sum < /tmp/upload.bin; exit 5"],
            env=remote.env, stdin=stdin, capture_output=True, timeout=120,
        )  # fmt: skip
    assert run.returncode == 5, run.stderr
    assert run.stdout.split()[0].decode() == hashlib.md5(data).hexdigest()
    # A command that stops reading early ends the session cleanly, with its own code.
    yes = subprocess.Popen(["yes"], stdout=subprocess.PIPE)
    try:
        head = subprocess.run(
            [str(BIN / "vendetta"), "workspace", "connect", "term", "--", "head", "-n", "2"],
            env=remote.env, stdin=yes.stdout, capture_output=True, timeout=60,
        )  # fmt: skip
    finally:
        yes.kill()
        yes.wait()
    assert (head.stdout, head.returncode) == (b"y\ny\n", 0), head.stderr
    # -n: the command reads end-of-file, and our stdin is left unread.
    with source.open("rb") as stdin:
        none = subprocess.run(
            [str(BIN / "vendetta"), "workspace", "connect", "term", "-n", "--", "wc", "-c"],
            env=remote.env, stdin=stdin, capture_output=True, timeout=60,
        )  # fmt: skip
        assert stdin.tell() == 0
    assert (none.stdout.strip(), none.returncode) == (b"0", 0), none.stderr


def test_no_terminal_and_no_command_says_what_to_do(remote: Env) -> None:
    out = remote.fails("workspace", "connect", "term")
    assert "no terminal" in out and "connect term -- CMD" in out


def test_stopped_workspace_is_refused(remote: Env) -> None:
    remote.cli("workspace", "down", "term")
    out = remote.fails("workspace", "connect", "term", "--", "true")
    assert "vendetta workspace up term" in out
    remote.cli("workspace", "up", "term")


class Tmux:
    def __init__(self, socket: str) -> None:
        self.socket = socket

    def __call__(self, *args: str) -> str:
        return subprocess.run(
            ["tmux", "-L", self.socket, *args], capture_output=True, text=True, check=True
        ).stdout

    def screen(self) -> str:
        return self("capture-pane", "-t", "s", "-p")

    def wait_for(self, text: str, within: float = 30) -> str:
        deadline = time.monotonic() + within
        while text not in (screen := self.screen()):
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} never showed:\n{screen}")
            time.sleep(0.2)
        return screen


def test_interactive_terminal_through_a_pty(remote: Env) -> None:
    if shutil.which("tmux") is None:
        if IN_CI:
            pytest.fail("tmux is needed (scripts/setup.sh installs it)")
        pytest.skip("tmux not installed")
    tmux = Tmux(f"vd-test-{remote.home.name}")
    env_args = [
        shlex.quote(f"{k}={v}") for k, v in remote.env.items() if k in ("VENDETTA_HOME", "PATH")
    ]
    connect = f"{BIN / 'vendetta'} workspace connect term"
    shell = f"env {' '.join(env_args)} {connect}; echo EXITED=$?; sleep 60"
    tmux("new-session", "-d", "-s", "s", "-x", "120", "-y", "30", shell)
    try:
        tmux.wait_for("/workspace #")  # the shell's prompt, in the workspace's workdir
        tmux("send-keys", "-t", "s", "echo hello-$((6*7)); hostname; stty size", "Enter")
        screen = tmux.wait_for("30 120")  # our terminal's size reached the PTY inside
        assert "hello-42\nterm\n30 120" in screen  # output, then the container's hostname
        # Resize: the CLI's SIGWINCH handling sends the new size along the stream.
        tmux("resize-window", "-t", "s", "-x", "100", "-y", "20")
        pane_tty = tmux("display", "-p", "-t", "s", "#{pane_tty}").strip()
        deadline = time.monotonic() + 10
        while (
            "20 100"
            not in subprocess.run(
                ["stty", "-F", pane_tty, "size"], capture_output=True, text=True, check=False
            ).stdout
        ):
            assert time.monotonic() < deadline, "tmux never resized its pane"
            time.sleep(0.1)
        # A detached tmux resizes the PTY without always signalling it: do what the
        # kernel does for an attached terminal, SIGWINCH to its foreground group.
        pane_pid = int(tmux("display", "-p", "-t", "s", "#{pane_pid}").strip())
        os.killpg(os.getpgid(pane_pid), signal.SIGWINCH)
        # The new size travels CLI -> coordinator -> agent -> engine apart from the keys:
        # ask until the PTY inside has it (a fixed 1 s was too short on a busy machine).
        deadline = time.monotonic() + 60
        while True:
            tmux("send-keys", "-t", "s", "clear; stty size", "Enter")
            try:
                tmux.wait_for("20 100", within=3)
                break
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
        tmux("send-keys", "-t", "s", "exit 3", "Enter")
        tmux.wait_for("EXITED=3")  # the exit code came back through
    finally:
        subprocess.run(["tmux", "-L", tmux.socket, "kill-server"], capture_output=True, check=False)


async def test_resizes_reach_the_terminal_inside(remote: Env) -> None:
    """The same stream the CLI opens: resize messages change the PTY inside."""
    import asyncio

    import grpc.aio

    from vendetta.v1 import common_pb2, coordinator_pb2_grpc

    sock = f"unix:{remote.env['VENDETTA_HOME']}/coordinator.sock"
    queue: asyncio.Queue[common_pb2.AttachInput | None] = asyncio.Queue()

    async def requests() -> AsyncIterator[common_pb2.AttachInput]:
        size = common_pb2.TerminalSize(rows=30, cols=120)
        yield common_pb2.AttachInput(
            start=common_pb2.AttachStart(workspace="term", tty=True, size=size)
        )
        while (msg := await queue.get()) is not None:
            yield msg

    out, code = b"", -1

    def sizes() -> list[str]:
        return [ln for ln in out.decode().split("\r\n") if ln[:1].isdigit()]

    async def type_() -> None:
        # A resize reaches the engine apart from the keys (Docker: its own API call):
        # ask `stty size` until the answer is the new size, never at fixed times (0.5 s
        # was too short on a busy machine). First the shell's prompt: its PTY exists.
        prompt = time.monotonic() + 60
        while b"/workspace #" not in out:
            if time.monotonic() > prompt:  # the assertions below say what came instead
                queue.put_nowait(common_pb2.AttachInput(stdin=b"exit 5\n"))
                return
            await asyncio.sleep(0.05)
        for rows, cols in ((20, 100), (40, 160)):
            queue.put_nowait(
                common_pb2.AttachInput(resize=common_pb2.TerminalSize(rows=rows, cols=cols))
            )
            deadline = time.monotonic() + 60
            while f"{rows} {cols}" not in sizes() and time.monotonic() < deadline:
                asked = len(sizes())
                queue.put_nowait(common_pb2.AttachInput(stdin=b"stty size\n"))
                answered = time.monotonic() + 3
                while len(sizes()) == asked:  # its answer, or ask again after 3 s
                    if time.monotonic() > answered:
                        break
                    await asyncio.sleep(0.05)
        queue.put_nowait(common_pb2.AttachInput(stdin=b"exit 5\n"))

    async with grpc.aio.insecure_channel(sock) as channel:
        typing = asyncio.create_task(type_())
        async for o in coordinator_pb2_grpc.CoordinatorStub(channel).Connect(requests()):
            kind = o.WhichOneof("output")
            if kind == "stdout":
                out += o.stdout
            elif kind == "exit_code":
                code = o.exit_code
        queue.put_nowait(None)
        await typing
    # Each size once it is answered, in the order given: the first answers may still
    # be the size the session started with.
    seen = [s for i, s in enumerate(sizes()) if i == 0 or sizes()[i - 1] != s]
    assert seen in (["20 100", "40 160"], ["30 120", "20 100", "40 160"]), (sizes(), code)
    assert code == 5, (sizes(), code)


# -- `vendetta ssh-config`: `ssh NAME.vendetta` with the real OpenSSH client ---------


def _ssh(remote: Env, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ssh", "-F", str(config), "-o", "BatchMode=yes", *args],
        env=remote.env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture()
def ssh_config(remote: Env) -> Path:
    config = remote.home / "dot-ssh" / "config"
    config.parent.mkdir(exist_ok=True)
    config.write_text("Host elsewhere\n  User someone\n")
    return config


def test_ssh_config_includes_once_with_consent(remote: Env, ssh_config: Path) -> None:
    before = ssh_config.read_text()
    out = remote.fails("ssh-config", "--file", str(ssh_config))
    assert "--dry-run" in out and "--yes" in out  # no terminal to ask: says how
    dry = remote.cli("ssh-config", "--file", str(ssh_config), "--dry-run")
    entries = Path(remote.env["VENDETTA_HOME"]) / "ssh" / "config"
    assert f'+Include "{entries}"' in dry.stdout
    assert ssh_config.read_text() == before  # a dry run changes nothing

    done = remote.cli("ssh-config", "--file", str(ssh_config), "--yes")
    assert "ssh term.vendetta" in done.stdout
    text = ssh_config.read_text()
    # At the top (an Include after a Host block would be scoped to it), the rest kept.
    assert text.splitlines()[1] == f'Include "{entries}"' and text.endswith(before)
    again = remote.json("ssh-config", "--file", str(ssh_config), "--yes")
    assert again["changed"] is False and again["included"] is True
    assert ssh_config.read_text() == text  # idempotent
    assert "term.vendetta" in again["hosts"]

    remote.cli("ssh-config", "--file", str(ssh_config), "--remove", "--yes")
    assert ssh_config.read_text() == before


def test_ssh_config_refuses_what_it_cannot_do(remote: Env, ssh_config: Path) -> None:
    out = remote.fails("ssh-config", "--file", str(ssh_config.parent), "--yes")
    assert f"{ssh_config.parent} is a folder, not an SSH config file" in out
    entries = Path(remote.env["VENDETTA_HOME"]) / "ssh" / "config"
    kept = entries.read_text()
    entries.unlink()
    try:
        out = remote.fails("ssh-config", "--file", str(ssh_config), "--yes")
        assert f"the coordinator has not written {entries}" in out
        assert "vendetta server stop && vendetta server start" in out
    finally:
        entries.write_text(kept)
    assert ssh_config.read_text() == "Host elsewhere\n  User someone\n"  # untouched


def test_ssh_to_a_workspace_runs_commands(remote: Env, ssh_config: Path) -> None:
    remote.cli("ssh-config", "--file", str(ssh_config), "--yes")
    ok = _ssh(remote, ssh_config, "term.vendetta", "true")
    assert ok.returncode == 0, ok.stderr
    run = _ssh(
        remote, ssh_config, "term.vendetta", "echo out-$((3*4)); hostname; echo err >&2; exit 7"
    )
    assert (run.stdout, run.stderr, run.returncode) == ("out-12\nterm\n", "err\n", 7)
    # stdin reaches the command, as with any sshd
    piped = subprocess.run(
        ["ssh", "-F", str(ssh_config), "-o", "BatchMode=yes", "term.vendetta", "tr a-z A-Z"],
        env=remote.env, input="piped through ssh\n", capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert (piped.stdout, piped.returncode) == ("PIPED THROUGH SSH\n", 0), piped.stderr


def test_ssh_entry_goes_with_the_workspace(remote: Env, ssh_config: Path) -> None:
    remote.cli("ssh-config", "--file", str(ssh_config), "--yes")
    cfg = remote.home / "p" / ".vendetta" / "config.yaml"
    remote.cli("workspace", "create", "brief", "--remote", "n1", "--config", str(cfg))
    entries = Path(remote.env["VENDETTA_HOME"]) / "ssh" / "config"
    # The coordinator rewrites the entries after each change, in its own time.
    wait_for("brief's entry", lambda: "Host brief.vendetta" in entries.read_text(), within=60)
    stopped = _ssh(remote, ssh_config, "brief.vendetta", "true")
    assert stopped.returncode == 255 and "vendetta workspace up brief" in stopped.stderr
    stale = remote.home / "stale-entries"  # what a client may still hold after destroy
    stale.write_text(entries.read_text())
    remote.cli("workspace", "destroy", "brief")
    # (It shared the 10 s deadline above, create and destroy included: short under load.)
    wait_for(
        "brief's entry to go",
        lambda: "Host brief.vendetta" not in entries.read_text(),
        within=60,
        show=entries.read_text,
    )
    assert "Host term.vendetta" in entries.read_text()
    gone = _ssh(remote, ssh_config, "brief.vendetta", "true")
    assert gone.returncode == 255 and "brief.vendetta" in gone.stderr  # no such host now
    # The proxy itself, for a workspace that is gone: the coordinator's error.
    old = _ssh(remote, stale, "brief.vendetta", "true")
    assert old.returncode == 255 and "unknown workspace 'brief'" in old.stderr, old.stderr


def test_interactive_ssh_session(remote: Env, ssh_config: Path) -> None:
    if shutil.which("tmux") is None:
        if IN_CI:
            pytest.fail("tmux is needed (scripts/setup.sh installs it)")
        pytest.skip("tmux not installed")
    remote.cli("ssh-config", "--file", str(ssh_config), "--yes")
    tmux = Tmux(f"vd-ssh-{remote.home.name}")
    shell = f"ssh -F {shlex.quote(str(ssh_config))} term.vendetta; echo EXITED=$?; sleep 60"
    tmux("new-session", "-d", "-s", "s", "-x", "120", "-y", "30", shell)
    try:
        tmux.wait_for("/workspace #")  # sessions start in the workdir
        tmux("send-keys", "-t", "s", "echo hello-$((6*7)); stty size; echo TERM=$TERM", "Enter")
        screen = tmux.wait_for("30 120")
        assert "hello-42\n30 120\n" in screen  # a PTY of tmux's size, inside
        assert re.search(r"TERM=(screen|tmux)", screen), screen  # the client's TERM too
        tmux("send-keys", "-t", "s", "exit 4", "Enter")
        tmux.wait_for("EXITED=4")
    finally:
        subprocess.run(["tmux", "-L", tmux.socket, "kill-server"], capture_output=True, check=False)
