"""What editors need of `ssh NAME.vendetta`, with the real OpenSSH client and the
generated `Host NAME.vendetta` entries, against workspaces on a node that logs
in as a user who is not root (vdnode) behind a real sshd, on Docker and LXD
in the Debian test image (scripts/build-test-image.sh) and in a QEMU guest of
the Debian guest image (its commands with input go over the guest's stream
port, providers/qemu/mux.py): `-L`, `-D` and `-W` to a
server listening on 127.0.0.1 inside (a large download intact), to a published
port straight at the environment's address (Docker), a refused forward
that leaves the session working, `-R` to a server here (gone with the session),
`-A` (only when asked, a socket private to the user inside), SetEnv and the
working folder, sftp/scp (both protocols), rsync, git push/clone, VS Code's
`ssh -T -D` sequence; and what an image without sftp-server or python3 says, and
sftp refused by the environment's own permissions.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import random
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import TEST_IMAGE, require
from tests.support.cli import Env, wait_for
from tests.support.editor_node import member_node, ssh_config

pytestmark = [pytest.mark.e2e, pytest.mark.sshd]

DEBIAN = "vendetta/debian12"
SECTIONS = {
    "docker": f"docker: {{image: '{DEBIAN}'}}",
    "lxd": f"lxd: {{image: '{DEBIAN}', cpu: 1, memory: 512M}}",
    "qemu": "qemu: {image: debian-12, cpu: 1, memory: 512M, disk: 2G}",
}
# Inside: a web server on 127.0.0.1 only (as dev servers listen), with a page and a
# file big enough to span many messages (made once: the service may be restarted).
WEB_PORT = 8080
PEER_PORT = 8081
UNPUBLISHED_PORT = 8082
SERVICES = (
    "services:\n  web:\n    command: >-\n"
    "      sh -c 'mkdir -p /tmp/www && echo hello from inside > /tmp/www/index.html"
    " && { test -e /tmp/www/big || { head -c 20000000 /dev/urandom > /tmp/www/.big"
    " && mv /tmp/www/.big /tmp/www/big; }; }"
    f" && exec python3 -m http.server {WEB_PORT} --bind 127.0.0.1 --directory /tmp/www'\n"
    # And one on all addresses, on a published port and on another, that answers each
    # connection with its peer's address.
    "  peer:\n    command: |-\n      python3 -c '\n      import socket, threading\n"
    '      def serve(port):\n          s = socket.create_server(("", port))\n'
    "          while True:\n              c, a = s.accept()\n"
    '              c.sendall(a[0].encode() + b"\\n")\n              c.close()\n'
    f"      threading.Thread(target=serve, args=({UNPUBLISHED_PORT},)).start()\n"
    f"      serve({PEER_PORT})\n      '\n"
    f"    port: {PEER_PORT}\n"
)


def _images_problem() -> str:
    import docker

    client = docker.from_env()
    try:
        client.images.get(f"{DEBIAN}:latest")
    except Exception:
        return f"Docker image {DEBIAN} missing (bash scripts/build-test-image.sh)"
    finally:
        client.close()
    lxd = subprocess.run(["lxc", "image", "info", DEBIAN], capture_output=True, check=False)
    if lxd.returncode != 0:
        return f"LXD image {DEBIAN} missing (bash scripts/build-test-image.sh)"
    return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Editor:
    env: Env
    config: Path  # the user's ssh config: includes the generated entries

    def ssh(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ssh", "-F", str(self.config), "-o", "BatchMode=yes", *args],
            env=self.env.env, input=input, capture_output=True, text=True, timeout=120,
            stdin=None if input is not None else subprocess.DEVNULL,
        )  # fmt: skip

    def background(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            ["ssh", "-F", str(self.config), "-o", "BatchMode=yes", "-N", *args],
            env=self.env.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip


@pytest.fixture(scope="module")
def editor() -> Iterator[Editor]:
    problem = _images_problem()
    require("the Debian test image", not problem, problem)
    with member_node("vd-editor-", "127.0.0.41") as e:
        for provider, section in SECTIONS.items():
            cfg = e.home / provider / ".vendetta" / "config.yaml"
            cfg.parent.mkdir(parents=True)
            cfg.write_text(f"name: ed\nprovider: {provider}\n{section}\n{SERVICES}")
            name = f"ed-{provider}"
            e.cli(
                "workspace", "create", name, "--remote", "n1", "--config", str(cfg),
                "--no-source",
            )  # fmt: skip
            e.cli("workspace", "up", name, timeout=300)
        # Two more on Docker: the Debian image as its user `dev`, and busybox (no
        # sftp-server, no python3 or bash).
        extra = {"ed-dev": f"user: dev\nworkdir: /srv/code\ndocker: {{image: '{DEBIAN}'}}\n",
                 "ed-plain": f"docker: {{image: '{TEST_IMAGE}'}}\n"}  # fmt: skip
        for name, body in extra.items():
            cfg = e.home / name / ".vendetta" / "config.yaml"
            cfg.parent.mkdir(parents=True)
            cfg.write_text(f"name: {name}\nprovider: docker\n{body}")
            (cfg.parent.parent / "marker.txt").write_text(f"source of {name}\n")
            # ed-dev has its folder as its source, at its workdir /srv/code.
            source = ["--source", str(cfg.parent.parent)] if name == "ed-dev" else []
            e.cli(
                "workspace", "create", name, "--remote", "n1", "--config", str(cfg),
                *(source or ["--no-source"]),
            )  # fmt: skip
            e.cli("workspace", "up", name, timeout=300)
        yield Editor(e, ssh_config(e))


@pytest.fixture(params=sorted(SECTIONS))
def ws(request: pytest.FixtureRequest, editor: Editor) -> str:
    return f"ed-{request.param}.vendetta"


def _get(url: str, proxy: str = "") -> bytes:
    cmd = ["curl", "-sS", "--max-time", "60", url]
    if proxy:
        cmd[1:1] = ["--socks5-hostname", proxy]
    run = subprocess.run(cmd, capture_output=True, timeout=90, check=False)
    return run.stdout if run.returncode == 0 else b""


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.terminate()
    try:
        _, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err


def test_local_forward_reaches_a_server_on_loopback_inside(editor: Editor, ws: str) -> None:
    good, refused = free_port(), free_port()
    # LogLevel INFO: OpenSSH logs a failed channel at INFO (the entries say ERROR).
    forwards = ["-L", f"{good}:127.0.0.1:{WEB_PORT}", "-L", f"{refused}:127.0.0.1:9"]
    proc = editor.background("-o", "LogLevel=INFO", *forwards, ws)
    try:
        page = wait_for("the page through -L", lambda: _get(f"http://127.0.0.1:{good}/"), within=90)
        assert page.decode().strip() == "hello from inside"
        # Nothing listens on port 9 inside: that channel fails, saying why...
        with socket.create_connection(("127.0.0.1", refused), timeout=30) as s:
            s.settimeout(30)
            assert s.recv(1) == b""  # closed, nothing sent
        # ...and the session goes on: a 20 MB download, intact.
        big = _get(f"http://127.0.0.1:{good}/big")
        inside = editor.ssh(ws, "md5sum /tmp/www/big")
        assert inside.returncode == 0, inside.stderr
        assert hashlib.md5(big).hexdigest() == inside.stdout.split()[0]
    finally:
        err = _stop(proc)
    assert "open failed" in err and "connection refused inside the workspace" in err, err


def test_dynamic_forward_with_a_socks_client(editor: Editor, ws: str) -> None:
    port = free_port()
    proc = editor.background("-D", f"127.0.0.1:{port}", ws)
    try:
        # "localhost" is resolved inside the workspace (--socks5-hostname).
        page = wait_for(
            "the page through -D",
            lambda: _get(f"http://localhost:{WEB_PORT}/", proxy=f"127.0.0.1:{port}"),
            within=60,
        )
        assert page.decode().strip() == "hello from inside"
    finally:
        _stop(proc)


def test_stdio_forward_half_closes(editor: Editor, ws: str) -> None:
    """`ssh -W`: our end-of-file reaches the server inside, its answer comes back."""
    run = editor.ssh("-W", f"127.0.0.1:{WEB_PORT}", ws, input="GET / HTTP/1.0\r\n\r\n")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("HTTP/1.0 200") and "hello from" in run.stdout


def test_a_published_port_is_reached_at_the_environments_address(editor: Editor, ws: str) -> None:
    """A port the workspace publishes (a service's `port:`) is reached from the agent
    itself, as `workspace ports` reaches it (the engine's exec stream stays out of
    the path): at the environment's address where it has one on the node (Docker's
    bridge: the service's peer is the node's side of it), else at the published
    endpoint (LXD instances here have no network, ENGINES.md: their proxy device
    connects from inside; QEMU's port forward from the user network's host side).
    Any other port goes through the relay inside, from 127.0.0.1, as sshd's -L."""
    name = ws.removesuffix(".vendetta")
    shown = json.loads(editor.env.cli("workspace", "status", name, "--json").stdout)
    address = next((a for a in shown.get("addresses", []) if ":" not in a), None)
    if name == "ed-docker":
        assert address, shown  # Docker's default bridge gives every container one

    def peer_at(port: int) -> str:
        return str(
            wait_for(
                f"the peer service's answer on {port}",
                lambda: editor.ssh("-W", f"127.0.0.1:{port}", ws).stdout.strip(),
                within=60,
            )
        )

    published = peer_at(PEER_PORT)
    if name == "ed-qemu":  # QEMU's port forward, from the user network's host side
        assert published != "127.0.0.1", published
    elif address is None:  # LXD's proxy device connects from inside
        assert published == "127.0.0.1"
    else:  # the node's side of the same bridge
        assert published != address, published
        assert published.rsplit(".", 1)[0] == address.rsplit(".", 1)[0], (published, address)
    assert peer_at(UNPUBLISHED_PORT) == "127.0.0.1"


def test_forward_to_a_port_nothing_listens_on(editor: Editor, ws: str) -> None:
    run = editor.ssh("-o", "LogLevel=INFO", "-W", "127.0.0.1:9", ws)
    assert run.returncode != 0
    assert "connection refused inside the workspace" in run.stderr, run.stderr
    assert editor.ssh(ws, "true").returncode == 0  # the workspace is still reachable


# -- sessions: environment, working folder, sftp and scp ----------------------------


def test_setenv_and_the_working_folder(editor: Editor, ws: str) -> None:
    # No source here (--no-source): the default workdir, once it exists, is where
    # sessions start.
    assert editor.ssh(ws, "mkdir -p /workspace").returncode == 0
    run = editor.ssh(
        "-o", "SetEnv=LANG=C.UTF-8 LC_TIME=C.UTF-8 SECRET=no", ws,
        'echo "$LANG|$LC_TIME|${SECRET:-unset}"; pwd',
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    lang, cwd = run.stdout.splitlines()
    assert lang == "C.UTF-8|C.UTF-8|unset"  # LANG and LC_* taken, others dropped (as sshd)
    assert cwd == "/workspace"


def test_docker_commands_without_a_terminal_read_the_agents_fifos(editor: Editor) -> None:
    """On Docker a session's command (scp's, rsync's, git's) has the agent's FIFOs as
    its stdin and stdout (providers/docker/fifo_pipes.py), not Docker's exec stream:
    also as the image's own user, with its input, stderr and exit code intact."""
    for ws, user in (("ed-docker.vendetta", "root"), ("ed-dev.vendetta", "dev")):
        line = "readlink /proc/$$/fd/0; id -un; wc -c; echo to-stderr >&2; exit 3"
        run = editor.ssh(ws, line, input="x" * 100_000)
        assert run.returncode == 3, run.stderr
        source, who, count = run.stdout.splitlines()
        # " (deleted)": the agent removes the FIFO once both ends hold it (a race with readlink).
        source = source.removesuffix(" (deleted)")
        assert source.startswith("/run/vendetta/") and source.endswith(".i"), source
        assert (who, count, run.stderr.strip()) == (user, "100000", "to-stderr")


def test_a_terminal_session(editor: Editor, ws: str) -> None:
    """`ssh -t`: the command on a terminal inside (QEMU: the guest's console, opened
    through libvirt by the non-root node user's agent), its exit code passed on."""
    run = editor.ssh("-tt", ws, "tty; test -t 0 && echo on-a-tty; exit 3")
    assert run.returncode == 3, run.stdout + run.stderr
    lines = run.stdout.replace("\r", "").splitlines()
    assert lines[0].startswith("/dev/") and "on-a-tty" in lines, lines


def test_sftp_and_scp_roundtrip(editor: Editor, ws: str, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    src = tmp_path / "up.bin"
    src.write_bytes(data)
    want = hashlib.md5(data).hexdigest()
    base = ["-F", str(editor.config), "-o", "BatchMode=yes"]
    batch = tmp_path / "batch"
    batch.write_text(
        f"put {src} /tmp/sftp.bin\nrename /tmp/sftp.bin /tmp/sftp2.bin\nls -l /tmp/sftp2.bin\n"
        f"get /tmp/sftp2.bin {tmp_path}/down.bin\nrm /tmp/sftp2.bin\n"
    )
    sftp = subprocess.run(
        ["sftp", *base, "-b", str(batch), ws],
        env=editor.env.env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert sftp.returncode == 0, sftp.stderr
    assert hashlib.md5((tmp_path / "down.bin").read_bytes()).hexdigest() == want
    assert editor.ssh(ws, "test ! -e /tmp/sftp2.bin").returncode == 0  # rm went through
    for mode in ([], ["-O"]):  # SFTP (OpenSSH's default), then the old scp protocol
        up = subprocess.run(
            ["scp", *base, *mode, str(src), f"{ws}:/tmp/scp.bin"],
            env=editor.env.env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert up.returncode == 0, (mode, up.stderr)
        inside = editor.ssh(ws, "md5sum /tmp/scp.bin")
        assert inside.stdout.split()[0] == want, mode
        back = tmp_path / f"back{len(mode)}.bin"
        down = subprocess.run(
            ["scp", *base, *mode, f"{ws}:/tmp/scp.bin", str(back)],
            env=editor.env.env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert down.returncode == 0, (mode, down.stderr)
        assert hashlib.md5(back.read_bytes()).hexdigest() == want, mode


# -- -R and -A: listeners inside that reach this side -----------------------------------


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"hello from the test machine\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_remote_forward_reaches_this_side_until_the_session_ends(editor: Editor, ws: str) -> None:
    here = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    threading.Thread(target=here.serve_forever, daemon=True).start()
    inside = random.randint(20000, 30000)
    fetch = f"curl -sS --max-time 10 http://127.0.0.1:{inside}/"
    proc = editor.background("-R", f"{inside}:127.0.0.1:{here.server_address[1]}", ws)
    try:
        got = wait_for(
            "the test machine through -R", lambda: editor.ssh(ws, fetch).stdout, within=60
        )
        assert got == "hello from the test machine\n"
    finally:
        _stop(proc)
        here.shutdown()
    # The session ended: so did the listener inside.
    wait_for("the port inside to close", lambda: editor.ssh(ws, fetch).returncode != 0)


@pytest.fixture(scope="module")
def ssh_agent(editor: Editor) -> Iterator[tuple[dict[str, str], str]]:
    folder = editor.env.home / "agent"
    folder.mkdir(mode=0o700)
    sock = folder / "sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        wait_for("ssh-agent", sock.exists, within=10)
        key = folder / "id"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "vd-editor-test", "-f", str(key)],
            check=True, capture_output=True,
        )  # fmt: skip
        env = {**editor.env.env, "SSH_AUTH_SOCK": str(sock)}
        subprocess.run(["ssh-add", str(key)], env=env, check=True, capture_output=True)
        listed = subprocess.run(["ssh-add", "-l"], env=env, capture_output=True, text=True)
        yield env, listed.stdout.split()[1]  # the key's fingerprint
    finally:
        agent.terminate()
        agent.wait()


def test_agent_forwarding_only_when_asked(
    editor: Editor, ws: str, ssh_agent: tuple[dict[str, str], str]
) -> None:
    env, fingerprint = ssh_agent
    base = ["ssh", "-F", str(editor.config), "-o", "BatchMode=yes"]
    script = 'ssh-add -l; stat -c "%a %U" "$(dirname "$SSH_AUTH_SOCK")"; id -un'
    asked = subprocess.run(
        [*base, "-A", ws, script], env=env, capture_output=True, text=True, timeout=60
    )
    assert asked.returncode == 0, asked.stderr
    lines = asked.stdout.splitlines()
    assert fingerprint in lines[0] and "vd-editor-test" in lines[0]
    mode, owner = lines[1].split()
    assert mode == "700" and owner == lines[2]  # private to the session's user
    plain = subprocess.run(
        [*base, ws, "echo ${SSH_AUTH_SOCK:-none}"], env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert plain.stdout.strip() == "none", plain.stderr


# -- programs of the image through exec: rsync, git; VS Code's own sequence ------------


def test_rsync_and_git_over_ssh(editor: Editor, ws: str, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_text("alpha\n")
    (tree / "sub" / "b.bin").write_bytes(os.urandom(200_000))
    rsh = f"ssh -F {editor.config} -o BatchMode=yes"
    run = subprocess.run(
        ["rsync", "-a", "-e", rsh, f"{tree}/", f"{ws}:/tmp/tree/"],
        env=editor.env.env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    back = tmp_path / "back"
    run = subprocess.run(
        ["rsync", "-a", "-e", rsh, f"{ws}:/tmp/tree/", f"{back}/"],
        env=editor.env.env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert (back / "sub" / "b.bin").read_bytes() == (tree / "sub" / "b.bin").read_bytes()

    # git: a bare repository inside, pushed to and cloned from over `NAME.vendetta`.
    made = editor.ssh(ws, "rm -rf /tmp/repo.git && git init -q --bare /tmp/repo.git")
    assert made.returncode == 0, made.stderr
    ident = (("NAME", "t"), ("EMAIL", "t@e"))
    who = {f"GIT_{role}_{k}": v for role in ("AUTHOR", "COMMITTER") for k, v in ident}
    git_env = {**editor.env.env, "GIT_SSH_COMMAND": rsh, **who}
    work = tmp_path / "work"

    def git(*args: str, cwd: Path = tmp_path) -> None:
        done = subprocess.run(
            ["git", *args], cwd=cwd, env=git_env, capture_output=True, text=True, timeout=120,
            check=False,
        )  # fmt: skip
        assert done.returncode == 0, (args, done.stderr)

    git("init", "-q", "-b", "main", str(work))
    (work / "README").write_text("pushed over ssh\n")
    git("add", "README", cwd=work)
    git("commit", "-q", "-m", "first", cwd=work)
    git("push", "-q", f"{ws}:/tmp/repo.git", "main", cwd=work)
    git("clone", "-q", "-b", "main", f"{ws}:/tmp/repo.git", str(tmp_path / "clone"))
    assert (tmp_path / "clone" / "README").read_text() == "pushed over ssh\n"


def test_vscode_remote_ssh_sequence(editor: Editor, ws: str) -> None:
    """What VS Code's Remote-SSH does, as far as it runs offline: `ssh -T -D PORT HOST
    bash`, a script on stdin that starts a server inside and prints its port, then
    connections to that port through the SOCKS forward of the same ssh."""
    port = free_port()
    script = (
        "mkdir -p /tmp/vsc && echo vscode-server-ok > /tmp/vsc/index.html\n"
        "setsid python3 -u -m http.server 0 --bind 127.0.0.1 --directory /tmp/vsc"
        " >/tmp/vsc/log 2>&1 </dev/null &\n"
        # Up to a minute for python to start and say its port (10 s was short under load).
        "for i in $(seq 600); do p=$(grep -o 'port [0-9]*' /tmp/vsc/log | cut -d' ' -f2);"
        ' [ -n "$p" ] && break; sleep 0.1; done\n'
        'echo "listeningOn==$p=="\n'
    )
    proc = subprocess.Popen(
        ["ssh", "-F", str(editor.config), "-o", "BatchMode=yes", "-T", "-D", str(port), ws,
         "bash"],
        env=editor.env.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(script)
        proc.stdin.flush()  # stdin stays open, as VS Code keeps it
        line = proc.stdout.readline()
        assert line.startswith("listeningOn=="), line
        inside = int(line.strip().split("==")[1])
        page = wait_for(
            "the server through the SOCKS forward",
            lambda: _get(f"http://127.0.0.1:{inside}/", proxy=f"127.0.0.1:{port}"),
            within=60,
        )
        assert page == b"vscode-server-ok\n"
    finally:
        _stop(proc)


# -- what the image lacks, what the user may not touch ---------------------------------


def test_an_image_without_sftp_server_or_python3(editor: Editor, tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_text("x")
    base = ["-F", str(editor.config), "-o", "BatchMode=yes"]
    scp = subprocess.run(
        ["scp", *base, str(src), "ed-plain.vendetta:/tmp/f"],
        env=editor.env.env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    # No sftp-server: the proxy serves SFTP itself (test_editor_sftp_builtin.py).
    assert scp.returncode == 0, scp.stderr
    assert editor.ssh("ed-plain.vendetta", "cat /tmp/f").stdout == "x"
    # Forwarding needs python3 inside for -R: refused with the reason, the session goes on.
    port = random.randint(20000, 30000)
    # -N: ssh waits for the forward's answer (with a command that ends at once, ssh may
    # end before the answer comes).
    run = editor.ssh(
        "-N", "-o", "ExitOnForwardFailure=yes", "-R", f"{port}:127.0.0.1:9", "ed-plain.vendetta"
    )  # fmt: skip
    assert run.returncode != 0 and "no python3" in run.stderr, run.stderr
    assert editor.ssh("ed-plain.vendetta", "true").returncode == 0


def test_sftp_outside_what_the_user_may_touch(editor: Editor, tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_text("x")
    who = editor.ssh("ed-dev.vendetta", "id -un")
    assert who.stdout.strip() == "dev", who.stderr
    batch = tmp_path / "batch"
    batch.write_text(f"-put {src} /root/f\nput {src} /tmp/mine\nls -l /tmp/mine\n")
    sftp = subprocess.run(
        ["sftp", "-F", str(editor.config), "-o", "BatchMode=yes", "-b", str(batch),
         "ed-dev.vendetta"],
        env=editor.env.env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    # The environment's own permissions refuse it; the session goes on to the next.
    assert "Permission denied" in sftp.stderr, sftp.stderr
    assert sftp.returncode == 0 and "/tmp/mine" in sftp.stdout, sftp.stderr
    owner = editor.ssh("ed-dev.vendetta", "stat -c %U /tmp/mine")
    assert owner.stdout.strip() == "dev"


def test_sessions_start_in_the_workdir_of_the_source(editor: Editor, tmp_path: Path) -> None:
    run = editor.ssh("ed-dev.vendetta", "pwd; cat marker.txt")
    assert run.returncode == 0, run.stderr
    assert run.stdout == "/srv/code\nsource of ed-dev\n"
    # sftp's relative paths start there too.
    batch = tmp_path / "batch"
    batch.write_text(f"get marker.txt {tmp_path}/m\n")
    sftp = subprocess.run(
        ["sftp", "-F", str(editor.config), "-o", "BatchMode=yes", "-b", str(batch),
         "ed-dev.vendetta"],
        env=editor.env.env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert sftp.returncode == 0, sftp.stderr
    assert (tmp_path / "m").read_text() == "source of ed-dev\n"
