"""The node probe's verdicts, and the stand-in for a provider whose SDK is missing."""

from __future__ import annotations

import pytest

from common.errors import FailedPreconditionError
from coordinator.transports.ssh_install import parse_probe
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
