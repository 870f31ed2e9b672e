"""Hostile input at the edges (issue 15, defects 3-5): config files that are not
files, too big, binary, nested or not ours; names that are huge or carry terminal
escapes; unix socket paths that would not fit. Each gets one clear error."""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Awaitable
from pathlib import Path

import grpc
import grpc.aio
import pytest
import yaml

from common import config_read
from common.config import load_config, parse_config
from common.display import neutral, shown
from common.errors import ConfigError, InvalidArgumentError
from common.names import validate_name
from common.paths import MAX_SOCKET_PATH
from common.socket_paths import owned_private_dir, short_private_dir, tunnel_socket
from coordinator.services import environment_spec, service_specs
from tests.support.bounded import bounded
from tests.support.fakes import Cluster
from vendetta.v1 import coordinator_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
SHADOW = (
    "root:$6$Qm9v$cGFzc3dvcmQtaGFzaC1zZWNyZXQ:20228:0:99999:7:::\n"
    "daemon:*:20228:0:99999:7:::\n"
    "alice:$y$j9T$c2VjcmV0LXNhbHQ$aGFzaA:20228:0:99999:7:::\n"
)


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}:"), message
    return message


def load_apart(path: Path, within: float = 30, wrap: list[str] | None = None) -> str:
    """load_config(path)'s error, read in a child process with 1 GiB of memory and a
    deadline: an unbounded read fails this test instead of the machine. ``wrap``:
    a command to run the child with (``capsh ... --`` then ``-c`` and a shell line)."""

    code = (
        "import sys\nfrom pathlib import Path\nfrom common.config import load_config\n"
        "from common.errors import ConfigError\n"
        "try:\n    load_config(Path(sys.argv[1]))\nexcept ConfigError as exc:\n"
        "    print(exc)\nelse:\n    print('accepted')\n"
    )
    try:
        argv = [sys.executable, "-c", code, str(path)]
        if wrap:
            argv = [*wrap, "-c", shlex.join(argv)]
        proc = subprocess.run(
            bounded(argv),
            capture_output=True,
            text=True,
            timeout=within,
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired:
        raise AssertionError(f"reading {path} did not return within {within} s") from None
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


# --- 3: bounded reads ------------------------------------------------------


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_a_device_is_refused_without_reading_it(device: str) -> None:
    assert "is a device, not a config file" in load_apart(Path(device))


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    assert "is a FIFO (named pipe), not a config file" in load_apart(fifo)


def test_a_directory_is_refused(tmp_path: Path) -> None:
    assert "is a directory, not a config file" in config_error(tmp_path)


def test_a_config_over_the_limit_is_refused_before_parsing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_parsing(*args: object, **kw: object) -> None:
        raise AssertionError("parsed a config over the limit")

    big = tmp_path / "big.yaml"
    big.write_text("name: p\n" + "# padding\n" * (config_read.MAX_CONFIG_BYTES // 10))
    monkeypatch.setattr(yaml, "load", no_parsing)
    message = config_error(big)
    assert f"is {big.stat().st_size} bytes" in message and "at most 1 MiB" in message


def test_a_config_just_under_the_limit_is_read(tmp_path: Path) -> None:
    ok = tmp_path / "ok.yaml"
    ok.write_text("name: p\n" + "#" * (config_read.MAX_CONFIG_BYTES - 9) + "\n")
    assert ok.stat().st_size == config_read.MAX_CONFIG_BYTES
    assert load_config(ok).name == "p"


def test_the_coordinator_refuses_config_text_over_the_limit() -> None:
    text = "name: p\n" + "#" * config_read.MAX_CONFIG_BYTES
    with pytest.raises(ConfigError, match="at most 1 MiB"):
        parse_config(text, "c.yaml")


def test_permission_denied_is_one_line(tmp_path: Path) -> None:
    locked = tmp_path / "c.yaml"
    locked.write_text("name: p\n")
    locked.chmod(0)
    if os.geteuid() != 0:
        assert "permission denied" in config_error(locked)
        return
    capsh = shutil.which("capsh")
    if capsh is None:
        pytest.skip("root reads any file, and capsh to drop that is missing")
    # root without the capabilities that read any file: as a user would be
    wrap = [capsh, "--drop=cap_dac_override,cap_dac_read_search", "--"]
    assert f"{locked}: permission denied" in load_apart(locked, wrap=wrap)


# --- 4: what used to be tracebacks ----------------------------------------


def test_binary_and_non_utf8_configs(tmp_path: Path) -> None:
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"name: p\n\x00\x01\x02")
    assert "is a binary file, not a vendetta config" in config_error(binary)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("name: p\nhooks: {setup: 'caf\xe9'}\n".encode("latin-1"))
    assert "is not UTF-8 text" in config_error(latin1)


@pytest.mark.parametrize("loader", ["C", "Python"])
def test_deeply_nested_yaml(loader: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if loader == "Python":  # the pure-Python parser recurses: RecursionError before
        monkeypatch.setattr(config_read, "_Loader", yaml.SafeLoader)
    for text in ("[" * 5000 + "]" * 5000, "name: p\nservices: " + "{a: " * 5000 + "}" * 5000):
        with pytest.raises(ConfigError, match=r"c\.yaml: .*nest"):
            parse_config(text, "c.yaml")
    with pytest.raises(ConfigError, match="nested deeper than 32 levels"):
        parse_config("name: p\nhooks: " + "[" * 200 + "]" * 200, "c.yaml")


def test_self_referring_and_exploding_aliases() -> None:
    with pytest.raises(ConfigError, match="refers to its own ancestor"):
        parse_config("name: p\nservices: &s {a: *s}\n", "c.yaml")
    bomb = "name: p\na0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n" for i in range(1, 9)
    )
    with pytest.raises(ConfigError, match="more than 100000 values"):
        parse_config(bomb, "c.yaml")


def test_config_values_stay_inside_what_the_agent_is_sent() -> None:
    # Accepted before and then a ValueError in the coordinator on create (int32, int64).
    with pytest.raises(ConfigError) as info:
        parse_config(
            "name: p\nqemu: {cpu: 99999999999999999999, memory: 99999999999T}\n"
            "services: {a: {command: x, health_check: {tcp: 1, retries: 99999999999}}}\n",
            "c.yaml",
        )
    message = str(info.value)
    assert "qemu.cpu: Input should be less than or equal to 1024" in message
    assert "qemu.memory: '99999999999T' is too big a size" in message
    assert "services.a.health_check.retries: Input should be less than" in message
    # The largest values accepted convert without error.
    cfg = parse_config(
        "name: p\nqemu: {cpu: 1024, memory: 8388607T, disk: 8388607T}\n"
        "lxd: {cpu: 1024, memory: 8388607T}\n"
        "services: {a: {command: x, health_check: {tcp: 1, retries: 1000000}}}\n",
        "c.yaml",
    )
    for provider in ("qemu", "lxd"):
        assert environment_spec("p", provider, cfg).cpus == 1024
    assert service_specs(cfg)[0].health.retries == 1_000_000


# --- 5: messages that leak or mislead -------------------------------------


def test_another_file_is_not_echoed(tmp_path: Path) -> None:
    shadow = tmp_path / "shadow"
    shadow.write_text(SHADOW)
    message = config_error(shadow)
    assert "is not a vendetta config" in message
    for secret in ("root", "$6$", "cGFzc3dvcmQ", "alice", "20228"):
        assert secret not in message.split(":", 1)[1], message
    passwd = tmp_path / "passwd"
    passwd.write_text("root:x:0:0:root:/root:/bin/bash\nbin:x:1:1::/:/bin/false\n")
    message = config_error(passwd)
    assert "is not a vendetta config" in message and "/bin/bash" not in message


def test_values_and_odd_keys_are_never_shown() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(
            'name: p\nqemu: {cpu: hunter2}\ndocker: {imagee: s3cr3t}\n"pass: hunter3 \\e[31m": 1\n',
            "c.yaml",
        )
    message = str(info.value)
    assert "qemu.cpu:" in message and "docker.imagee: unknown key" in message
    assert "<a key that is not a name>: unknown key" in message
    for secret in ("hunter2", "s3cr3t", "hunter3", "\x1b"):
        assert secret not in message


def test_yaml_errors_give_the_position_not_the_line() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("name: p\npassword: hunter2\n  oops: [\n", "c.yaml")
    message = str(info.value)
    assert "c.yaml: not valid YAML at line 3" in message and "hunter2" not in message
    with pytest.raises(ConfigError) as info:
        parse_config("name: p\npassword: hunter2\x1b[2J\n", "c.yaml")
    message = str(info.value)
    assert "at line 2, column 18: character #x001b is not allowed in YAML" in message
    assert "hunter2" not in message


def test_many_problems_are_capped() -> None:
    text = "name: p\n" + "".join(f"key{i}: 1\n" for i in range(100))
    with pytest.raises(ConfigError) as info:
        parse_config(text, "c.yaml")
    lines = str(info.value).splitlines()
    assert len(lines) == 1 + config_read.MAX_PROBLEMS + 1
    assert lines[-1] == "  ... and 80 more problems"


def test_a_path_with_escapes_is_shown_escaped(tmp_path: Path) -> None:
    odd = tmp_path / "a\x1b[31m\u202eb.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(odd)
    message = str(info.value)
    assert "\x1b" not in message and "\u202e" not in message
    assert "a\\x1b[31m\\u202eb.yaml: no such file" in message


def test_display_neutralises_control_and_bidi_characters() -> None:
    assert neutral("plain name-1") == "plain name-1"
    assert neutral("a\x1b[2Jb\u202ec\u200bd\r\n") == "a\\x1b[2Jb\\u202ec\\u200bd\\r\\n"
    assert shown("x" * 10_000, 20) == "x" * 20 + "... (10000 characters)"
    assert neutral("\udcff") == "\\udcff"  # a non-UTF-8 byte of a path: printable escape


def test_a_huge_or_escaped_name_gets_the_rule_in_a_short_line() -> None:
    with pytest.raises(InvalidArgumentError) as info:
        validate_name("workspace", "a" * 10_000)
    message = str(info.value)
    assert len(message) < 400 and "(10000 characters)" in message
    assert "1-63 characters" in message
    with pytest.raises(InvalidArgumentError) as info:
        validate_name("workspace", "ws\x1b]0;pwned\x07\u202e")
    assert str(info.value).isprintable()


async def test_the_coordinator_checks_names_before_saying_unknown(cluster: Cluster) -> None:
    calls: list[Awaitable[object]] = [
        cluster.stub.GetWorkspace(pb.GetWorkspaceRequest(name="a" * 10_000)),
        cluster.stub.UpWorkspace(pb.WorkspaceRequest(name="ws\x1b[31m\u202e")),
        cluster.stub.GetNode(pb.GetNodeRequest(name="n" * 10_000)),
        cluster.stub.RemoveNode(pb.RemoveNodeRequest(name="n\x1b[0m")),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        details = info.value.details() or ""
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, details
        assert "1-63 characters" in details and details.isprintable(), details
        assert "create it with" not in details and "add it with" not in details


# --- 5: unix socket paths that fit ---------------------------------------

NODE63 = "n" * 62 + "1"


def _bind(path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
    path.unlink()


@pytest.mark.parametrize("home_length", [10, 40, 75, 200])
def test_tunnel_sockets_fit_for_a_63_character_node(tmp_path: Path, home_length: int) -> None:
    home = tmp_path / ("h" * max(1, home_length - len(str(tmp_path)) - 1))
    tunnels = home / ".local" / "state" / "vendetta" / "tunnels"
    path = tunnel_socket(tunnels, NODE63)
    assert len(os.fsencode(str(path))) <= MAX_SOCKET_PATH
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    _bind(path)  # a real unix socket there
    assert tunnel_socket(tunnels, NODE63) == path, "the same node, the same socket"
    assert tunnel_socket(tunnels, "n" * 62 + "2") != path
    if len(str(tunnels / f"{NODE63}.sock")) <= MAX_SOCKET_PATH:
        assert path == tunnels / f"{NODE63}.sock", "readable names while they fit"
    if not path.is_relative_to(tmp_path):  # the short folder outside: ours to drop
        path.parent.rmdir()


def test_short_socket_folders_differ_per_coordinator_and_stay_private(tmp_path: Path) -> None:
    a = short_private_dir(tmp_path / ("a" * 150))
    b = short_private_dir(tmp_path / ("b" * 150))
    assert a != b and a.parent == b.parent
    for d in (a, a.parent):
        st = d.lstat()
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()
    a.rmdir()
    b.rmdir()


def test_a_short_folder_someone_else_made_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    with pytest.raises(InvalidArgumentError, match="not a folder of this user"):
        owned_private_dir(link)
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir()
        os.chown(theirs, 4242, 4242)
        with pytest.raises(InvalidArgumentError, match="not a folder of this user"):
            owned_private_dir(theirs)
