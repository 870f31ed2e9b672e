"""The node probe's verdicts, the free-space checks of an install, and the stand-in
for a provider whose SDK is missing."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from common import agent_process
from common.errors import FailedPreconditionError
from coordinator.transports.ssh_install import (
    _SPACE,
    Space,
    _failure,
    check_space,
    parse_probe,
    parse_space,
)
from nodeagent.providers import unavailable

GOOD = "arch x86_64\nhome /home/dev\ndata /home/dev/.local/share\npython /usr/bin/python3\n"


def test_a_supported_python3_gives_the_install_folder() -> None:
    facts = parse_probe("n", GOOD + "version Python 3.12.3\n")
    assert facts.version == (3, 12, 3) and facts.arch == "x86_64"
    assert facts.install_dir("0.1.0+ab") == "/home/dev/.local/share/vendetta/agent/0.1.0+ab"
    assert facts.agent_command("b")[0] == "/home/dev/.local/share/vendetta/agent/b/bin/python"


@pytest.mark.parametrize(
    ("probe", "message"),
    [
        ("arch x86_64\nhome /h\ndata /h/.local/share\n", "has no python3"),
        (GOOD + "version Python 3.9.18\n", "has Python 3.9.18 (/usr/bin/python3)"),
        (GOOD + "version Python 2.7.18\n", "has Python 2.7.18"),
        (GOOD + "version sh: python3: bad interpreter\n", "not a Python version"),
        (GOOD.replace("x86_64", "riscv64") + "version Python 3.11.2\n", "riscv64 machine"),
    ],
)
def test_nodes_the_agent_cannot_run_on_are_named(probe: str, message: str) -> None:
    with pytest.raises(FailedPreconditionError) as exc:
        parse_probe("n", probe)
    assert message in str(exc.value)
    if "python" in message.lower():
        assert "3.11, 3.12, 3.13, 3.14" in str(exc.value)


async def test_a_provider_whose_sdk_is_missing_is_listed_not_ready_with_the_fix() -> None:
    provider = unavailable("qemu", "cannot import libvirt: apt install libvirt-dev")("agent-1")
    ready = await provider.readiness()
    assert provider.name == "qemu" and not ready.ready
    assert "apt install libvirt-dev" in ready.detail
    with pytest.raises(FailedPreconditionError) as exc:
        await provider.inspect("ws")
    assert "qemu provider cannot run on this node" in str(exc.value)


FACTS = parse_probe("n", GOOD + "version Python 3.11.2\n")
NEEDED = 121_000_000


def test_the_space_probe_finds_the_nearest_folder_its_free_bytes_and_rights(
    tmp_path: Path,
) -> None:
    base = tmp_path / "with space" / "vendetta" / "agent"
    (tmp_path / "with space").mkdir()
    out = subprocess.run(
        [sys.executable, "-c", _SPACE, str(base)], capture_output=True, text=True, check=True
    ).stdout
    space = parse_space(out)
    assert space is not None
    assert space.where == str(tmp_path / "with space") and space.writable
    assert space.free is not None  # the same disk as this process sees (give or take)
    assert abs(space.free - shutil.disk_usage(tmp_path).free) < 1 << 30
    assert parse_space("") is None and parse_space("Traceback (most recent") is None


@pytest.mark.parametrize(
    ("space", "message"),
    [
        (
            Space("/home/dev/.local/share", 4_000_000, True),
            "no space left on the node's disk at /home/dev/.local/share (4 MB free, the "
            "agent needs about 121 MB): free some space there and retry",
        ),
        (
            Space("/home/dev", 10**10, False),
            "the SSH user cannot write to /home/dev, where the agent is installed "
            "(/home/dev/.local/share/vendetta/agent): make it writable for that user, or "
            "set XDG_DATA_HOME",
        ),
    ],
    ids=["full", "read-only"],
)
def test_an_install_that_cannot_fit_or_be_written_is_refused_with_the_fix(
    space: Space, message: str
) -> None:
    with pytest.raises(FailedPreconditionError) as exc:
        check_space("n", FACTS, space, NEEDED)
    assert message in str(exc.value)
    check_space("n", FACTS, Space("/home/dev", NEEDED, True), NEEDED)  # just fits


class _Node:
    """A connection whose space probe answers ``free`` bytes (the rest is not run)."""

    def __init__(self, free: int) -> None:
        self.free = free

    async def run(self, script: str, **_: object) -> SimpleNamespace:
        assert "disk_usage" in script
        return SimpleNamespace(exit_status=0, stdout=f"{self.free} 1 /home/dev/.local/share\n")


@pytest.mark.parametrize(
    ("output", "free", "full"),
    [
        # pip or venv said so; its leftovers are gone, so there is room again now
        ("ERROR: Could not install packages due to an OSError: [Errno 28] No space", 10**10, True),
        # SFTP says only "Failure": there is not room for the agent
        ("Failure", 5_000_000, True),
        ("Failure", 10**10, False),  # room enough: not the disk, the error as it is
    ],
)
async def test_a_failed_install_names_a_full_disk(output: str, free: int, full: bool) -> None:
    conn: Any = _Node(free)
    exc = await _failure(conn, "n", FACTS, NEEDED, output, f"sending failed: {output}")
    if full:
        assert "no space left on the node's disk at /home/dev/.local/share (" in str(exc)
        assert "free some space there and retry" in str(exc)
    else:
        assert str(exc) == "sending failed: Failure"


async def test_an_agent_state_folder_it_cannot_create_is_named_with_the_fix(
    tmp_path: Path,
) -> None:
    (tmp_path / "state").write_text("a file, not a folder")
    with pytest.raises(FailedPreconditionError) as exc:
        await agent_process.ensure(tmp_path / "state" / "vendetta-agent", [])
    assert f"cannot create the agent's state folder {tmp_path}/state/vendetta-agent" in str(
        exc.value
    )
    assert "set XDG_STATE_HOME (or VENDETTA_AGENT_DIR) to a writable folder" in str(exc.value)
