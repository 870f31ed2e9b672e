"""The proxy's own SFTP server (cli/sftp_builtin.py) against a folder here, its
commands run by busybox's shell and applets (what an image without sftp-server
has; the system's sh where busybox is missing), as nobody when the tests run as
root so that refusals are the folder's own permissions: through asyncssh's SFTP
client and through OpenSSH's sftp and scp over a real SSH connection."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import cast

import asyncssh
import pytest

from cli import sftp_builtin, sftp_exec, ssh_proxy, ssh_session
from cli.agent_route import Link
from cli.sftp_builtin import Inside
from cli.sftp_exec import Ran, Runner, Sink, Source
from cli.ssh_session import Workdir
from vendetta.v1 import common_pb2, coordinator_pb2

BUSYBOX = shutil.which("busybox")


@pytest.fixture
def root() -> Iterator[Path]:
    """A folder the runner's user owns (nobody's, when we are root)."""
    path = Path(tempfile.mkdtemp(prefix="vd-sftp-"))
    os.chmod(path, 0o755)
    top = path / "home"
    top.mkdir()
    if os.geteuid() == 0:
        os.chown(top, 65534, 65534)
    try:
        yield top
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _bin(folder: Path) -> str:
    """PATH of busybox's applets only, so `stat`, `cat`, ... are busybox's."""
    if BUSYBOX is None:
        return os.environ.get("PATH", "/usr/bin:/bin")
    bindir = folder / "bin"
    bindir.mkdir(exist_ok=True)
    listed = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True)
    for applet in listed.stdout.split():
        with_link = bindir / applet
        if not with_link.exists():
            with_link.symlink_to(BUSYBOX)
    return str(bindir)


class LocalRunner:
    """A Runner that runs the line here (the fake exec behind the interface)."""

    def __init__(self, folder: Path, tmp: Path | None = None) -> None:
        self.path = _bin(folder)
        self.lines: list[str] = []
        self.env = {"PATH": self.path, "LC_ALL": "C"}
        if tmp is not None:  # mktemp's folder
            tmp.mkdir(exist_ok=True)
            tmp.chmod(0o777)
            self.env["TMPDIR"] = str(tmp)

    async def __call__(
        self, line: str, stdin: Source | None = None, stdout: Sink | None = None
    ) -> Ran:
        self.lines.append(line)
        shell = [BUSYBOX, "sh"] if BUSYBOX else ["/bin/sh"]
        user = [
            shutil.which("setpriv") or "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ]
        argv = [*(user if os.geteuid() == 0 else []), *shell, "-c", line]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=self.env, cwd="/",
        )  # fmt: skip
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None

        async def feed() -> None:
            assert proc.stdin is not None
            try:
                while stdin is not None and (data := stdin.read(65536)):
                    proc.stdin.write(data)
                    await proc.stdin.drain()
                proc.stdin.close()
            except (BrokenPipeError, ConnectionResetError):
                pass

        async def drain() -> bytes:
            assert proc.stdout is not None
            out = bytearray()
            while data := await proc.stdout.read(65536):
                if stdout is not None:
                    stdout.write(data)
                else:
                    out.extend(data)
            return bytes(out)

        _, out, err = await asyncio.gather(feed(), drain(), proc.stderr.read())
        return Ran(await proc.wait(), out, err)


class _Ssh(asyncssh.SSHServer):
    """As the proxy's: no authentication, every session through ssh_session.Process,
    served by sftp_builtin (what the proxy does once the image has no sftp-server)."""

    def __init__(self, run: Runner, workdir: str) -> None:
        self.run = run
        self.workdir = workdir

    def begin_auth(self, username: str) -> bool:
        return False

    def session_requested(self) -> ssh_session.Process:
        return ssh_session.Process(self.handle)

    async def handle(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        if process.subsystem != "sftp":
            process.exit(127)
            return
        process.exit(await sftp_builtin.serve(process, self.run, self.workdir))


@contextlib.asynccontextmanager
async def _client(port: int) -> AsyncIterator[asyncssh.SFTPClient]:
    async with (
        asyncssh.connect("127.0.0.1", port, known_hosts=None, username="u") as conn,
        conn.start_sftp_client() as sftp,
    ):
        yield sftp


@contextlib.asynccontextmanager
async def _listening(run: Runner, root: Path) -> AsyncIterator[int]:
    """An SSH server whose sftp sessions the builtin serves over ``run``; its port."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    listener = await asyncssh.listen(
        "127.0.0.1", 0, server_factory=lambda: _Ssh(run, str(root)), server_host_keys=[key],
        encoding=None, line_editor=False,
    )  # fmt: skip
    try:
        yield listener.get_port()
    finally:
        listener.close()
        await listener.wait_closed()


@pytest.fixture
async def server(root: Path) -> AsyncIterator[tuple[int, LocalRunner]]:
    run = LocalRunner(root.parent)
    async with _listening(run, root) as port:
        yield port, run


async def test_files_folders_and_links_through_an_sftp_client(
    server: tuple[int, LocalRunner], root: Path, tmp_path: Path
) -> None:
    port, run = server
    data = os.urandom(700_000)  # several reads and writes
    local = tmp_path / "up.bin"
    local.write_bytes(data)
    async with _client(port) as sftp:
        # Relative paths start in the session's folder.
        assert await sftp.realpath(".") == str(root)
        assert await sftp.getcwd() == str(root)
        await sftp.put(str(local), "a.bin")
        assert (root / "a.bin").read_bytes() == data
        attrs = await sftp.stat("a.bin")
        assert attrs.size == len(data) and attrs.type == asyncssh.FILEXFER_TYPE_REGULAR
        await sftp.get("a.bin", str(tmp_path / "down.bin"))
        assert (tmp_path / "down.bin").read_bytes() == data
        await sftp.mkdir("sub dir")
        await sftp.rename("a.bin", "sub dir/it's $(x).bin")
        assert (root / "sub dir" / "it's $(x).bin").read_bytes() == data
        names = await sftp.listdir("sub dir")
        assert sorted(names) == [".", "..", "it's $(x).bin"]
        entries = {n.filename: n for n in await sftp.readdir("sub dir")}
        assert entries["it's $(x).bin"].attrs.size == len(data)
        assert "it's $(x).bin" in str(entries["it's $(x).bin"].longname)
        # Appending and rewriting in place keep what was there.
        async with sftp.open("sub dir/it's $(x).bin", "r+b") as f:
            await f.write(b"HEAD", 0)
        assert (root / "sub dir" / "it's $(x).bin").read_bytes()[:5] == b"HEAD" + data[4:5]
        await sftp.symlink("sub dir", "link")
        assert await sftp.readlink("link") == "sub dir"
        assert await sftp.realpath("link") == str(root / "sub dir")
        await sftp.symlink("sub dir/it's $(x).bin", "flink")
        assert await sftp.realpath("flink") == str(root / "sub dir" / "it's $(x).bin")
        assert await sftp.realpath("sub dir/../new") == str(root / "new")
        await sftp.remove("flink")
        assert (await sftp.lstat("link")).type == asyncssh.FILEXFER_TYPE_SYMLINK
        await sftp.chmod("sub dir/it's $(x).bin", 0o600)
        await sftp.utime("sub dir/it's $(x).bin", (1_000_000_000, 1_100_000_000))
        st = (root / "sub dir" / "it's $(x).bin").stat()
        assert st.st_mode & 0o777 == 0o600 and int(st.st_mtime) == 1_100_000_000
        await sftp.remove("sub dir/it's $(x).bin")
        await sftp.remove("link")
        await sftp.rmdir("sub dir")
        assert sorted(p.name for p in root.iterdir()) == []
        # Written without truncating: the file's own bytes stay where none were
        # written, fetched only when needed (not when all is written and truncated).
        (root / "n").write_bytes(b"0123456789")
        if os.geteuid() == 0:
            os.chown(root / "n", 65534, 65534)  # the runner's
        async with sftp.open("n", asyncssh.FXF_WRITE, encoding=None) as f:
            await f.write(b"AB", 0)
        assert (root / "n").read_bytes() == b"AB23456789"
        async with sftp.open("n", asyncssh.FXF_WRITE, encoding=None) as f:
            await f.write(b"XY", 5)
        assert (root / "n").read_bytes() == b"AB234XY789"
        fetched = len(run.lines)
        async with sftp.open("n", asyncssh.FXF_WRITE, encoding=None) as f:
            await f.write(b"abc", 0)
            await f.truncate(3)
        assert (root / "n").read_bytes() == b"abc"
        assert not any("exec cat -- " in line for line in run.lines[fetched:]), run.lines
        await sftp.remove("n")
        # Refusals by what the command said.
        with pytest.raises(asyncssh.SFTPNoSuchFile):
            await sftp.stat("missing")
        with pytest.raises(asyncssh.SFTPNoSuchFile):
            await sftp.get("missing", str(tmp_path / "m"))
        (root / "f").write_text("x")
        # SFTP v3 has no "exists" status: a failure, with the command's words.
        with pytest.raises(asyncssh.SFTPFailure, match="File exists"):
            await sftp.rename("f", ".")


@pytest.mark.skipif(os.geteuid() != 0, reason="as root, the runner is nobody")
async def test_refusals_are_the_environments_own_and_the_session_goes_on(
    server: tuple[int, LocalRunner], root: Path, tmp_path: Path
) -> None:
    port, _ = server
    (root.parent / "theirs").mkdir(mode=0o755)  # root's: nobody may not write there
    (root / "secret").write_text("no")
    (root / "secret").chmod(0)
    os.chown(root / "secret", 0, 0)
    local = tmp_path / "f"
    local.write_text("x")
    async with _client(port) as sftp:
        with pytest.raises(asyncssh.SFTPPermissionDenied):
            await sftp.put(str(local), str(root.parent / "theirs" / "f"))
        with pytest.raises(asyncssh.SFTPPermissionDenied):
            await sftp.get("secret", str(tmp_path / "s"))
        with pytest.raises(asyncssh.SFTPPermissionDenied):
            await sftp.mkdir(str(root.parent / "theirs" / "d"))
        with pytest.raises(asyncssh.SFTPPermissionDenied):
            await sftp.chmod("secret", 0o644)
        await sftp.put(str(local), "mine")  # the session goes on
    assert (root / "mine").read_text() == "x"
    assert not (root.parent / "theirs" / "f").exists()


@pytest.mark.skipif(not shutil.which("sftp"), reason="needs OpenSSH's sftp and scp")
async def test_openssh_sftp_and_scp(
    server: tuple[int, LocalRunner], root: Path, tmp_path: Path
) -> None:
    port, _ = server
    data = os.urandom(300_001)
    (tmp_path / "up.bin").write_bytes(data)
    opts = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]  # fmt: skip
    batch = tmp_path / "batch"
    batch.write_text(
        f"put {tmp_path}/up.bin up.bin\nmkdir d\nrename up.bin d/moved.bin\nls -l d\n"
        f"get d/moved.bin {tmp_path}/down.bin\nrm d/moved.bin\nrmdir d\n-get gone {tmp_path}/x\n"
        "pwd\n"
        # Trees both ways, a link, a mode, and a resumed upload.
        f"put -r {tmp_path}/tree tree\nget -r tree {tmp_path}/back\nln -s tree/a lnk\n"
        f"chmod 640 tree/a\nput {tmp_path}/half.bin part.bin\nreput {tmp_path}/up.bin part.bin\n"
    )
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "a").write_text("a\n")
    (tmp_path / "tree" / "sub" / "b").write_bytes(data[:1000])
    (tmp_path / "half.bin").write_bytes(data[:100_000])

    async def run(*argv: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        return await proc.wait(), out.decode(), err.decode()

    code, out, err = await run("sftp", *opts, "-P", str(port), "-b", str(batch), "u@127.0.0.1")
    assert code == 0, err
    assert (tmp_path / "down.bin").read_bytes() == data
    assert "moved.bin" in out and f"Remote working directory: {root}" in out, out
    assert "not found" in err, err  # -get gone: refused, the batch went on
    assert (tmp_path / "back" / "sub" / "b").read_bytes() == data[:1000]
    assert (root / "tree" / "a").stat().st_mode & 0o777 == 0o640
    assert os.readlink(root / "lnk") == "tree/a"
    assert (root / "part.bin").read_bytes() == data  # the rest appended where it stopped
    assert sorted(p.name for p in root.iterdir()) == ["lnk", "part.bin", "tree"]
    # scp in its SFTP mode (OpenSSH's default), both ways.
    code, _, err = await run(
        "scp", *opts, "-P", str(port), f"{tmp_path}/up.bin", "u@127.0.0.1:s.bin"
    )
    assert code == 0, err
    assert (root / "s.bin").read_bytes() == data
    code, _, err = await run(
        "scp", *opts, "-P", str(port), "u@127.0.0.1:s.bin", f"{tmp_path}/b.bin"
    )
    assert code == 0, err
    assert (tmp_path / "b.bin").read_bytes() == data


@pytest.mark.parametrize(
    ("said", "kind"),
    [
        ("cat: can't open '/root/x': Permission denied", asyncssh.SFTPPermissionDenied),
        ("sh: can't create /etc/x: Permission denied", asyncssh.SFTPPermissionDenied),
        ("chown: f: Operation not permitted", asyncssh.SFTPPermissionDenied),
        ("stat: can't stat 'x': No such file or directory", asyncssh.SFTPNoSuchFile),
        ("rmdir: 'd': Directory not empty", asyncssh.SFTPDirNotEmpty),
        ("rm: 'd' is a directory", asyncssh.SFTPFileIsADirectory),
        ("mkdir: can't create directory 'x': File exists", asyncssh.SFTPFileAlreadyExists),
        ("something else went wrong", asyncssh.SFTPFailure),
    ],
)
def test_messages_become_sftp_statuses(said: str, kind: type[asyncssh.SFTPError]) -> None:
    err = sftp_exec.error(Ran(1, b"", f"noise\n{said}\n".encode()))
    assert type(err) is kind and err.reason == said


async def test_a_path_that_is_not_utf8_is_refused_before_any_command() -> None:
    ran: list[str] = []

    async def run(line: str, stdin: Source | None = None, stdout: Sink | None = None) -> Ran:
        ran.append(line)
        return Ran(0, b"", b"")

    with pytest.raises(asyncssh.SFTPInvalidFilename):
        await Inside(run, "/w").stat(b"\xff", True, {})
    assert ran == []


async def test_the_command_lines_quote_every_path() -> None:
    ran: list[str] = []

    async def run(line: str, stdin: Source | None = None, stdout: Sink | None = None) -> Ran:
        ran.append(line)
        return Ran(0, b"81a4 1 0 0 0 0 1 root root\n", b"")

    inside = Inside(run, "/w s")
    await inside.stat(b"a; rm -rf /", False, {})
    assert ran == ["cd '/w s' 2>/dev/null; stat -c '%f %s %u %g %X %Y %h %U %G' -- 'a; rm -rf /'"]


# -- the proxy's session: the image's sftp-server where it has one, else the builtin ----


class _Coordinator:
    """Connect and GetWorkspace as the coordinator answers them, the line run here
    as a process (as nobody when we are root), its stdin and output streamed."""

    def __init__(self, root: Path, path: str, no_input: bool = False) -> None:
        self.root = root
        self.path = path
        self.no_input = no_input  # as QEMU's guest agent: input dropped
        self.lines: list[str] = []

    async def GetWorkspace(self, request: object) -> coordinator_pb2.Workspace:
        ws = coordinator_pb2.Workspace()
        ws.source.workdir = str(self.root)
        return ws

    async def Connect(
        self, requests: AsyncIterator[common_pb2.AttachInput]
    ) -> AsyncIterator[common_pb2.ExecOutput]:
        inputs = aiter(requests)
        start = (await anext(inputs)).start
        self.lines.append(start.argv[-1])
        user = [shutil.which("setpriv") or "setpriv", "--reuid=65534", "--regid=65534",
                "--clear-groups"]  # fmt: skip
        proc = await asyncio.create_subprocess_exec(
            *(user if os.geteuid() == 0 else []), *start.argv,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env={"PATH": self.path, **start.env}, cwd="/",
        )  # fmt: skip
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        yield common_pb2.ExecOutput()  # the session is open

        async def pump() -> None:
            assert proc.stdin is not None
            if self.no_input:
                proc.stdin.close()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                async for msg in inputs:
                    if self.no_input:
                        continue
                    if msg.WhichOneof("input") == "stdin":
                        proc.stdin.write(msg.stdin)
                        await proc.stdin.drain()
                    elif msg.WhichOneof("input") == "stdin_eof":
                        proc.stdin.close()

        feeder = asyncio.create_task(pump())
        err = asyncio.create_task(proc.stderr.read())
        try:
            while data := await proc.stdout.read(65536):
                yield common_pb2.ExecOutput(stdout=data)
            if said := await err:
                yield common_pb2.ExecOutput(stderr=said)
            yield common_pb2.ExecOutput(exit_code=await proc.wait())
        finally:
            feeder.cancel()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


class _Link:
    routes = False  # no agent's dial socket here: sessions go through Connect

    def __init__(self, stub: _Coordinator) -> None:
        self._stub = stub

    async def stub(self) -> _Coordinator:
        return self._stub

    async def close(self) -> None:
        pass


@pytest.mark.skipif(not shutil.which("sftp"), reason="needs OpenSSH's sftp and scp")
@pytest.mark.parametrize(
    ("image_has_one", "no_input"), [(False, False), (True, False), (True, True), (False, True)]
)
async def test_the_proxy_serves_sftp_where_the_image_has_no_sftp_server(
    root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    image_has_one: bool,
    no_input: bool,
) -> None:
    """...or where commands get no input (QEMU), which the image's would not either."""
    here = [s for s in ssh_session.SFTP_SERVERS if os.access(s, os.X_OK)]
    if image_has_one and not here:
        pytest.skip("no OpenSSH sftp-server on this machine")
    monkeypatch.setattr(
        ssh_session, "SFTP_SERVERS", tuple(here) if image_has_one else ("/nonexistent/sftp-server",)
    )
    coordinator = _Coordinator(root, _bin(root.parent), no_input)
    link = cast(Link, _Link(coordinator))
    workdir = Workdir(link, "w")
    proxy = ssh_proxy._Server("w", link, lambda p: ssh_proxy._session(proxy, workdir, p))
    listener = await asyncssh.listen(
        "127.0.0.1", 0, server_factory=lambda: proxy,
        server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
        encoding=None, line_editor=False, allow_scp=False,
    )  # fmt: skip
    data = os.urandom(400_003)
    (tmp_path / "up.bin").write_bytes(data)
    batch = tmp_path / "batch"
    batch.write_text(f"put {tmp_path}/up.bin up.bin\nls\nget up.bin {tmp_path}/down.bin\n")
    opts = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o",
            "BatchMode=yes", "-o", "LogLevel=ERROR", "-P", str(listener.get_port())]  # fmt: skip
    try:
        proc = await asyncio.create_subprocess_exec(
            "sftp", *opts, "-b", str(batch), "u@127.0.0.1", stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert await proc.wait() == 0, err.decode()
        assert (root / "up.bin").read_bytes() == data  # relative: the workdir
        assert (tmp_path / "down.bin").read_bytes() == data
        assert b"up.bin" in out
    finally:
        listener.close()
        await listener.wait_closed()
    # Whether input gets there is asked by the sftp line itself (its probe), not by a
    # command of its own.
    sftp_line, *others = coordinator.lines
    assert "sftp-server" in sftp_line and ssh_session.SFTP_PROBE.decode().strip() in sftp_line
    assert "exec cat" not in others
    if no_input:  # then the builtin, told so
        assert not any("sftp-server" in line for line in others), others
        assert any(f"> {root}/up.bin" in line for line in others), others
        return
    # The builtin: each operation a command of its own; the image's server: none.
    assert bool(others) is not image_has_one
    assert not others or any(f"exec cat > {root}/up.bin" in line for line in others), others


def test_nothing_of_asyncssh_s_local_file_operations_is_left() -> None:
    """asyncssh's SFTPServer acts on the machine it runs on (the user's): every
    method of it that could touch a file must be the builtin's (inside)."""
    harmless = {"_to_sftpname", "convert_attrs", "exit", "format_longname", "lock", "unlock",
                "map_path", "reverse_map_path"}  # fmt: skip
    methods = {n for n, v in vars(asyncssh.SFTPServer).items() if callable(v)}
    inherited = {n for n in methods - set(vars(sftp_builtin.Server)) if not n.startswith("__")}
    assert inherited <= harmless, inherited - harmless


class NoInputRunner(LocalRunner):
    """As QEMU's guest agent: commands run with their input at end-of-file, what
    is written to them is dropped, and output past ``cap`` bytes is an error."""

    def __init__(self, folder: Path, tmp: Path | None = None, cap: int = 1 << 40) -> None:
        super().__init__(folder, tmp)
        self.cap = cap

    async def __call__(
        self, line: str, stdin: Source | None = None, stdout: Sink | None = None
    ) -> Ran:
        sent = 0

        class Counted:
            def write(self, data: bytes, /) -> object:
                nonlocal sent
                sent += len(data)
                return stdout.write(data) if stdout is not None else None

        ran = await super().__call__(line, None, Counted() if stdout is not None else None)
        if max(sent, len(ran.out)) > self.cap:
            return Ran(1, b"", b"the guest agent cut the output")
        return ran


@contextlib.asynccontextmanager
async def _serving(run: Runner, root: Path) -> AsyncIterator[asyncssh.SFTPClient]:
    """The builtin over ``run``, and a client of it."""
    async with _listening(run, root) as port, _client(port) as sftp:
        yield sftp


def _theirs(path: Path, data: bytes) -> Path:
    """A file the runner's user owns, holding ``data``."""
    path.write_bytes(data)
    if os.geteuid() == 0:
        os.chown(path, 65534, 65534)
    return path


async def test_where_commands_get_no_input_files_are_written_through_command_lines(
    root: Path, tmp_path: Path
) -> None:
    tmp = root.parent / "tmp"  # where the runner's user may go (not tmp_path)
    run = NoInputRunner(root.parent, tmp)
    data = os.urandom(3 * sftp_builtin.ARG_SLICE + 1000)  # several slices
    (tmp_path / "up.bin").write_bytes(data)
    async with _serving(run, root) as sftp:
        await sftp.put(str(tmp_path / "up.bin"), "a.bin")
        assert (root / "a.bin").read_bytes() == data
        before = _theirs(root / "kept", b"old content").stat()
        # An empty file written back (not truncated at open): through the lines too.
        async with sftp.open("kept", asyncssh.FXF_WRITE, encoding=None) as f:
            await f.truncate(0)
        after = (root / "kept").stat()
        assert after.st_size == 0 and after.st_ino == before.st_ino
        assert "base64 -d" in run.lines[-3] and "> kept" in run.lines[-2], run.lines[-3:]
        await sftp.get("a.bin", str(tmp_path / "down.bin"))
        assert (tmp_path / "down.bin").read_bytes() == data
    # Input was asked about once, then never sent; the parts in TMPDIR are gone.
    assert run.lines.count("exec cat") == 1
    assert not any("exec cat > " in line for line in run.lines), run.lines
    assert any(str(tmp) in line for line in run.lines if "base64 -d" in line)
    assert list(tmp.iterdir()) == []


async def test_where_commands_get_no_input_files_are_read_in_slices(
    root: Path, tmp_path: Path
) -> None:
    mib = sftp_builtin.MIB
    piece = sftp_builtin.READ_MIBS * mib
    run = NoInputRunner(root.parent, cap=3 * mib)  # libvirt fails 3 MiB of output
    data = os.urandom(2 * piece + 5)
    _theirs(root / "big", data)
    _theirs(root / "whole", data[:piece])  # a slice's size: then an empty one
    async with _serving(run, root) as sftp:
        await sftp.get("big", str(tmp_path / "big"))
        assert (tmp_path / "big").read_bytes() == data
        await sftp.get("whole", str(tmp_path / "whole"))
        assert (tmp_path / "whole").read_bytes() == data[:piece]
        with pytest.raises(asyncssh.SFTPNoSuchFile):
            await sftp.get("missing", str(tmp_path / "m"))
        with pytest.raises(asyncssh.SFTPError, match="Is a directory"):
            await sftp.open(".", "rb")
        if os.geteuid() == 0:  # the runner is nobody
            _theirs(root / "secret", b"x").chmod(0)
            os.chown(root / "secret", 0, 0)
            with pytest.raises(asyncssh.SFTPPermissionDenied):
                await sftp.get("secret", str(tmp_path / "s"))
    assert sum("dd if=big " in line for line in run.lines) == 3


async def test_a_failing_cleanup_does_not_hide_the_error() -> None:
    async def run(line: str, stdin: Source | None = None, stdout: Sink | None = None) -> Ran:
        if line.startswith("rm "):
            raise ConnectionError("the link went down")
        if "mktemp" in line:
            return Ran(0, b"/tmp/tmp.x\n", b"")
        return Ran(1, b"", b"base64: write error: No space left on device")

    with pytest.raises(asyncssh.SFTPNoSpaceOnFilesystem):
        await Inside(run, "/w", gets_input=False).write_back(b"f", io.BytesIO(b"data"))


async def test_two_handles_and_changes_inside_keep_each_others_writes(
    server: tuple[int, LocalRunner], root: Path
) -> None:
    port, run = server
    rw = asyncssh.FXF_READ | asyncssh.FXF_WRITE
    f = _theirs(root / "f", b"0123456789")
    async with _client(port) as sftp:
        a = await sftp.open("f", rw, encoding=None)
        b = await sftp.open("f", rw, encoding=None)
        await a.write(b"AA", 0)
        await b.write(b"BB", 8)
        await a.close()
        await b.close()
        assert f.read_bytes() == b"AA234567BB"  # sftp-server's result
        # Changed inside while open: what was not written here stays.
        async with sftp.open("f", rw, encoding=None) as h:
            await h.write(b"x", 1)
            assert cast(bytes, await h.read(4, 0)) == b"Ax23"  # the file's bytes around the write
            f.write_bytes(b"ZZZZZZZZZZZZ")
            await h.write(b"y", 3)
        assert f.read_bytes() == b"ZxZyZZZZZZZZ"
        # Truncated then written past the end: zeros between, not the old bytes.
        async with sftp.open("f", asyncssh.FXF_WRITE, encoding=None) as h:
            await h.truncate(2)
            await h.write(b"E", 5)
            assert (await h.stat()).size == 6
        assert f.read_bytes() == b"Zx\0\0\0E"
        # scp's way (write-only, all from 0, then the size): the file is not fetched.
        fetched = len(run.lines)
        async with sftp.open("f", asyncssh.FXF_WRITE, encoding=None) as h:
            await h.write(b"abc", 0)
            await h.truncate(3)
        assert f.read_bytes() == b"abc"
        assert not any("exec cat -- " in line for line in run.lines[fetched:]), run.lines
        # Appending: at the end the file has then.
        async with sftp.open("f", asyncssh.FXF_WRITE | asyncssh.FXF_APPEND, encoding=None) as h:
            await h.write(b"1", 0)
            f.write_bytes(b"abcd")
            await h.write(b"2", 0)
        assert f.read_bytes() == b"abcd12"


async def test_fsync_writes_the_file_now(server: tuple[int, LocalRunner], root: Path) -> None:
    port, _ = server
    f = _theirs(root / "f", b"0123456789")
    async with _client(port) as sftp, sftp.open("f", "r+b") as h:
        await h.write(b"AB", 2)
        await h.fsync()
        assert f.read_bytes() == b"01AB456789"
        f.write_bytes(b"abcdefghij")  # changed inside after: not undone at close
        await h.write(b"Z", 9)
    assert f.read_bytes() == b"abcdefghiZ"


async def test_each_fsetstat_of_an_open_file_is_kept(
    server: tuple[int, LocalRunner], root: Path
) -> None:
    port, _ = server
    f = _theirs(root / "f", b"x")
    f.chmod(0o644)
    async with _client(port) as sftp, sftp.open("f", "r+b") as h:
        await h.write(b"y", 0)
        await h.chmod(0o600)
        await h.utime((1_000_000_000, 1_100_000_000))
    st = f.stat()
    assert st.st_mode & 0o777 == 0o600 and int(st.st_mtime) == 1_100_000_000


async def test_a_full_disk_here_is_not_the_workspace_s(
    server: tuple[int, LocalRunner], root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port, _ = server

    class Full(io.BytesIO):
        def write(self, data: object, /) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    (tmp_path / "up").write_bytes(b"data")
    monkeypatch.setattr(tempfile, "TemporaryFile", Full)
    async with _client(port) as sftp:
        with pytest.raises(asyncssh.SFTPFailure) as caught:
            await sftp.put(str(tmp_path / "up"), "up")
    assert type(caught.value) is asyncssh.SFTPFailure
    assert tempfile.gettempdir() in str(caught.value.reason), caught.value.reason
