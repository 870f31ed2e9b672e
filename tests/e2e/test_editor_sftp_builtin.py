"""sftp and scp (its SFTP mode, OpenSSH's default) through `NAME.vendetta` into
workspaces whose image has no sftp-server (busybox, on Docker and LXD, and a
QEMU guest whose python3 and sftp-server the test removes first, as in a guest
image of a user's without them: with no python3 for its stream port, commands
there get no input, and files go in through command lines): the
proxy serves SFTP itself, each operation a command inside as the workspace's
user (uid 1000 here, not root), with the real OpenSSH client and the generated
`Host NAME.vendetta` entries, on a node that logs in as a user who is not root.
What that user may not touch is refused by the environment's own permissions,
and the session goes on.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.ssh_session import SFTP_SERVERS
from tests.conftest import LXD_TEST_IMAGE, TEST_IMAGE
from tests.e2e.test_editor_ssh import Editor
from tests.support.editor_node import member_node, ssh_config

pytestmark = [pytest.mark.e2e, pytest.mark.sshd]

# Not root inside: /root (root's, 0755) may be read, not written.
WHO = "user: '1000:1000'\n"
SECTIONS = {
    "docker": f"docker: {{image: '{TEST_IMAGE}'}}\n",
    "lxd": f"lxd: {{image: '{LXD_TEST_IMAGE}', cpu: 1, memory: 256M}}\n",
    "qemu": "qemu: {image: debian-12, cpu: 1, memory: 512M, disk: 2G}\n",
}


@pytest.fixture(scope="module")
def editor() -> Iterator[Editor]:
    with member_node("vd-sftpb-", "127.0.0.43") as e:
        for provider, section in SECTIONS.items():
            cfg = e.home / provider / ".vendetta" / "config.yaml"
            cfg.parent.mkdir(parents=True)
            cfg.write_text(f"name: sb\nprovider: {provider}\n{WHO}{section}")
            name = f"sb-{provider}"
            e.cli(
                "workspace", "create", name, "--remote", "n1", "--config", str(cfg),
                "--no-source",
            )  # fmt: skip
            e.cli("workspace", "up", name, timeout=300)
            if provider == "qemu":
                _strip_guest(name)
        yield Editor(e, ssh_config(e))


def _strip_guest(workspace: str) -> None:
    """As root in the guest, through its agent (before any command with input has
    started the stream relay): no python3, no sftp-server."""
    import libvirt

    from providers.qemu import agent

    conn = libvirt.open("qemu:///system")
    try:
        [dom] = [d for d in conn.listAllDomains() if d.name().startswith(f"vd-{workspace}-")]
        gone = "rm -f /usr/bin/python3 /usr/bin/python3.* " + " ".join(SFTP_SERVERS)
        pid = agent.exec_start(dom, ["/bin/sh", "-c", gone], {}, capture=True)
        deadline = time.monotonic() + 60
        while not (status := agent.exec_status(dom, pid))[0]:
            assert time.monotonic() < deadline, "rm in the guest did not end"
            time.sleep(0.2)
        assert status[1] == 0, status
    finally:
        conn.close()


@pytest.fixture(params=sorted(SECTIONS))
def ws(request: pytest.FixtureRequest, editor: Editor) -> str:
    name = f"sb-{request.param}.vendetta"
    # The premise: no sftp-server, no python3 (the QEMU guest's stream relay), not root.
    servers = " ".join(SFTP_SERVERS)
    probe = editor.ssh(name, f'for s in {servers} python3; do command -v "$s"; done; id -u')
    assert probe.stdout.split() == ["1000"], probe.stdout + probe.stderr
    return name


def _run(editor: Editor, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [argv[0], "-F", str(editor.config), "-o", "BatchMode=yes", *argv[1:]],
        env=editor.env.env, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip


def _md5_inside(editor: Editor, ws: str, path: str) -> str:
    run = editor.ssh(ws, f"md5sum {path}")
    assert run.returncode == 0, run.stderr
    return run.stdout.split()[0]


def test_sftp_put_get_ls_rename_mkdir_rm(editor: Editor, ws: str, tmp_path: Path) -> None:
    data = os.urandom(2 * 1024 * 1024 + 33)
    src = tmp_path / "up.bin"
    src.write_bytes(data)
    want = hashlib.md5(data).hexdigest()
    assert editor.ssh(ws, "rm -rf /tmp/sb && mkdir /tmp/sb").returncode == 0
    batch = tmp_path / "batch"
    batch.write_text(
        "pwd\n"
        f"put {src} /tmp/sb/a.bin\n"
        "cd /tmp\n"  # relative paths from here on
        "mkdir sb/dir\n"
        "rename sb/a.bin sb/dir/b.bin\n"
        "ls -l sb/dir\n"
        f"get sb/dir/b.bin {tmp_path}/down.bin\n"
    )
    sftp = _run(editor, "sftp", "-b", str(batch), ws)
    assert sftp.returncode == 0, sftp.stderr
    # sftp starts where sessions start (the workdir where it exists), as sshd's does.
    start = editor.ssh(ws, "pwd").stdout.strip()
    assert f"Remote working directory: {start}\n" in sftp.stdout, (start, sftp.stdout)
    listed = [line for line in sftp.stdout.splitlines() if line.startswith("-rw")]
    assert len(listed) == 1 and listed[0].endswith(" b.bin"), sftp.stdout
    # uid 1000, or its name where the image has one (the QEMU guest's `dev`; busybox's
    # `id -un` prints the number and fails where there is none).
    me = {"1000", *editor.ssh(ws, "id -un 2>/dev/null").stdout.split()}
    assert str(len(data)) in listed[0].split(), listed
    assert any(f" {name} " in listed[0] for name in me), (me, listed)
    assert hashlib.md5((tmp_path / "down.bin").read_bytes()).hexdigest() == want
    assert _md5_inside(editor, ws, "/tmp/sb/dir/b.bin") == want
    owner = editor.ssh(ws, "stat -c %u /tmp/sb/dir/b.bin; ls /tmp/sb")
    assert owner.stdout.split() == ["1000", "dir"], owner.stdout  # made by the user, moved
    batch.write_text("rm /tmp/sb/dir/b.bin\nrmdir /tmp/sb/dir\nls /tmp/sb\n")
    sftp = _run(editor, "sftp", "-b", str(batch), ws)
    assert sftp.returncode == 0, sftp.stderr
    assert editor.ssh(ws, "ls -A /tmp/sb").stdout == ""  # rm and rmdir went through


def test_scp_both_ways_in_sftp_mode(editor: Editor, ws: str, tmp_path: Path) -> None:
    # More than one slice each way on QEMU (2 MiB reads, 64 KiB writes through command
    # lines, each a guest-agent call: a smaller file there keeps the test short).
    size = (2 if ws.startswith("sb-qemu") else 5) * 1024 * 1024 + 1
    data = os.urandom(size)
    src = tmp_path / "up.bin"
    src.write_bytes(data)
    want = hashlib.md5(data).hexdigest()
    up = _run(editor, "scp", str(src), f"{ws}:/tmp/scp.bin")  # no -O: SFTP
    assert up.returncode == 0, up.stderr
    assert _md5_inside(editor, ws, "/tmp/scp.bin") == want
    back = tmp_path / "back.bin"
    down = _run(editor, "scp", f"{ws}:/tmp/scp.bin", str(back))
    assert down.returncode == 0, down.stderr
    assert hashlib.md5(back.read_bytes()).hexdigest() == want
    # -p: the times and mode come along (set after the data, so they stay).
    small = tmp_path / "small.bin"
    small.write_bytes(os.urandom(70_000))  # two write slices on QEMU
    small.chmod(0o750)
    os.utime(small, (1_000_000_000, 1_000_000_000))
    up = _run(editor, "scp", "-p", str(small), f"{ws}:/tmp/scp-p.bin")
    assert up.returncode == 0, up.stderr
    got = editor.ssh(ws, "stat -c '%a %Y' /tmp/scp-p.bin")
    assert got.stdout.split() == ["750", "1000000000"], got.stdout + got.stderr


def test_refused_by_the_environments_permissions(editor: Editor, ws: str, tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_text("x\n")
    made = editor.ssh(ws, "echo no > /tmp/secret && chmod 000 /tmp/secret && rm -f /tmp/mine")
    assert made.returncode == 0, made.stderr
    batch = tmp_path / "batch"
    batch.write_text(
        f"-put {src} /root/f\n-get /tmp/secret {tmp_path}/s\n-mkdir /root/d\n-rm /etc/passwd\n"
        f"put {src} /tmp/mine\nls -l /tmp/mine\n"
    )
    sftp = _run(editor, "sftp", "-b", str(batch), ws)
    # Each refusal says so; the session goes on to the next command.
    assert sftp.stderr.count("Permission denied") >= 4, sftp.stderr
    assert sftp.returncode == 0 and "/tmp/mine" in sftp.stdout, sftp.stderr
    assert not (tmp_path / "s").exists()
    inside = editor.ssh(ws, "ls /root; cat /tmp/mine; test -e /etc/passwd && echo kept")
    assert inside.stdout.split() == ["x", "kept"], inside.stdout + inside.stderr
    # scp refused the same way, with the reason.
    scp = _run(editor, "scp", str(src), f"{ws}:/root/f")
    assert scp.returncode != 0 and "Permission denied" in scp.stderr, scp.stderr
