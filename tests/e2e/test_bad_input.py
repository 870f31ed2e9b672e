"""Hostile input through the real CLI and a real coordinator (issue 15, defects 3-5):
config paths that are devices, FIFOs, folders, huge, binary, nested or someone
else's file; option values out of range; names that are huge or carry escapes; a
63-character node behind a long $HOME. Each ends in one clear line, non-zero, at once.

The coordinator here keeps its state in the default place under a long $HOME, as a
user's would: its socket fits there, a tunnel named after a 63-character node did not.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.socket_paths import tunnel_socket
from tests.support.bounded import bounded
from tests.support.cli import BIN, Env, cli_env, wait_for
from tests.support.sshd import SshServer

pytestmark = [pytest.mark.e2e, pytest.mark.docker, pytest.mark.sshd]

HOME_LENGTH = 60  # the coordinator's socket fits (99 bytes); NODE63's tunnel did not
NODE63 = "node-" + "x" * 57 + "1"
SECRETS = ("$6$Qm9v$", "cGFzc3dvcmQ", "alice")


@pytest.fixture(scope="module")
def e2e() -> Iterator[Env]:
    with cli_env("vd-bad-") as e:
        home = e.home / ("h" * (HOME_LENGTH - len(str(e.home)) - 1))
        home.mkdir()
        e.env["HOME"] = str(home)
        e.env.pop("VENDETTA_HOME")
        e.env.pop("XDG_STATE_HOME", None)
        e.agent_dirs.append(home / ".local" / "state" / "vendetta" / "agent")
        e.cli("server", "start")
        yield e


def fails(e: Env, *args: str, code: int | None = None) -> str:
    """Run a command that must fail at once with one `error:` line. Bounded (1 GiB,
    30 s): before the fixes some of these read /dev/zero until memory ran out."""

    try:
        proc = subprocess.run(
            bounded([str(BIN / "vendetta"), *args]),
            env=e.env,
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise AssertionError(f"vendetta {' '.join(args)[:200]} hung") from None
    shown = f"vendetta {' '.join(args)[:200]}: {proc.returncode}\n{proc.stdout}{proc.stderr}"
    assert proc.returncode != 0, shown
    if code is not None:
        assert proc.returncode == code, shown
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert lines and lines[0].startswith("error: "), shown
    assert "Traceback" not in proc.stderr and "\x1b" not in proc.stderr, shown
    return " ".join(lines)


def config_fails(e: Env, path: Path | str) -> str:
    """Both places that read a config say the same one thing about ``path``."""
    validate = fails(e, "config", "validate", str(path), code=1)
    create = fails(e, "workspace", "create", "bad-cfg", "--config", str(path), code=1)
    assert validate == create, (validate, create)
    assert len(validate.splitlines()) == 1
    return validate


def test_config_paths_that_are_not_config_files(e2e: Env) -> None:
    fifo = e2e.home / "fifo.yaml"
    os.mkfifo(fifo)
    assert "/dev/zero: is a device, not a config file" in config_fails(e2e, "/dev/zero")
    assert "/dev/urandom: is a device" in config_fails(e2e, "/dev/urandom")
    assert f"{fifo}: is a FIFO (named pipe), not a config file" in config_fails(e2e, fifo)
    assert "/etc: is a directory, not a config file" in config_fails(e2e, "/etc")


def test_a_50_mb_config_is_refused_before_it_is_parsed(e2e: Env) -> None:
    big = e2e.home / "big.yaml"
    with big.open("w") as f:
        f.write("name: big\n")
        f.write(("# " + "x" * 97 + "\n") * (50 * 1024 * 1024 // 100))
    message = config_fails(e2e, big)
    assert f"is {big.stat().st_size} bytes; a vendetta config may be at most 1 MiB" in message
    assert e2e.json("workspace", "list") == []


def test_binary_nested_and_foreign_configs(e2e: Env) -> None:
    binary = e2e.home / "binary.yaml"
    binary.write_bytes(os.urandom(4096).replace(b"\0", b"") + b"\0")
    assert "is a binary file, not a vendetta config" in config_fails(e2e, binary)
    latin1 = e2e.home / "latin1.yaml"
    latin1.write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert "is not UTF-8 text" in config_fails(e2e, latin1)
    deep = e2e.home / "deep.yaml"
    deep.write_text("name: deep\nhooks: " + "[" * 100_000 + "]" * 100_000 + "\n")
    assert "nest" in config_fails(e2e, deep)
    shadow = e2e.home / "shadow"
    shadow.write_text(
        "root:$6$Qm9v$cGFzc3dvcmQtaGFzaC1zZWNyZXQ:20228:0:99999:7:::\n"
        "alice:$6$Qm9v$cGFzc3dvcmQtaGFzaC1zZWNyZXQ:20228:0:99999:7:::\n"
    )
    message = config_fails(e2e, shadow)
    assert "is not a vendetta config" in message
    assert not any(s in message for s in SECRETS), message
    real = Path("/etc/shadow")  # the case of the issue, where it is readable
    if os.access(real, os.R_OK):
        message = config_fails(e2e, real)
        assert "/etc/shadow: is not a vendetta config" in message
        for line in filter(None, real.read_text().splitlines()):
            fields = line.split(":")
            assert line not in message
            assert len(fields) < 2 or len(fields[1]) < 4 or fields[1] not in message


def test_option_values_out_of_range(e2e: Env) -> None:
    big = "99999999999999999999"
    assert "--tail 99999999999999999999: use 0" in fails(
        e2e, "workspace", "logs", "w", "--tail", big, code=2
    )
    assert "before 1970 or after 2262" in fails(
        e2e, "workspace", "logs", "w", "--since", "99999999d", code=2
    )
    assert f"port {big} is not a TCP port" in fails(
        e2e, "node", "add", "n1", "127.0.0.1", "--port", big, code=2
    )
    assert "--grace nan" in fails(e2e, "node", "add", "n1", "127.0.0.1", "--grace", "nan")
    assert "an empty node name" in fails(e2e, "workspace", "create", "w", "--remote", "")


def test_names_that_are_huge_or_carry_escapes(e2e: Env) -> None:
    huge = fails(e2e, "workspace", "status", "w" * 10_000, code=2)
    assert "invalid workspace name" in huge and "(10000 characters)" in huge
    assert "metadata" not in huge and len(huge) < 400
    assert "invalid node name" in fails(e2e, "node", "remove", "n" * 10_000, code=2)
    odd = fails(e2e, "workspace", "up", "ws\x1b[31m\u202eevil", code=2)
    assert "'ws\\x1b[31m\\u202eevil'" in odd and "\u202e" not in odd
    # A valid unknown name gets the hint, and it is the name as typed.
    assert "create it with `vendetta workspace create nope`" in fails(
        e2e, "workspace", "up", "nope", code=1
    )


def test_a_63_character_node_behind_a_long_home(e2e: Env) -> None:
    tunnels = Path(e2e.env["HOME"]) / ".local" / "state" / "vendetta" / "tunnels"
    assert len(str(tunnels / f"{NODE63}.sock")) > 107, "the case that failed before"
    server = SshServer.start(e2e.home / "sshd63", host="127.0.0.4")
    e2e.nodes[NODE63] = server
    agent_dir = e2e.home / "a63"
    e2e.agent_dirs.append(agent_dir)
    e2e.cli(
        "node",
        "add",
        NODE63,
        server.host,
        "--port",
        str(server.port),
        "--user",
        server.user,
        "--identity",
        str(server.client_key_path),
        "--yes",
        "--agent-command",
        f"{BIN / 'vendetta-agent'} --dir {agent_dir}",
    )
    assert e2e.wait_node(NODE63, "ready")["agent_version"]
    # The tunnel's socket: short, private, and the one the coordinator listens on.
    sock = tunnel_socket(tunnels, NODE63)
    assert len(str(sock)) <= 107
    assert stat.S_ISSOCK(sock.stat().st_mode), sock
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    e2e.cli("node", "remove", NODE63)
    # Removing the node closes its tunnel: the socket goes, its short folder is ours to drop.
    wait_for("the tunnel's socket removed", lambda: not sock.exists(), within=30)
    sock.parent.rmdir()
