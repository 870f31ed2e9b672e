"""The test node that is a machine of its own (tests/support/node_machine.py) is what
it says: reached over its own sshd on loopback, with python3, without vendetta,
and without a network to fetch anything from."""

from __future__ import annotations

from collections.abc import Iterator

import asyncssh
import pytest

from tests.conftest import require
from tests.support.node_machine import NODE_USER, NodeMachine, image_problem

pytestmark = [pytest.mark.lxd, pytest.mark.sshd]


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeMachine]:
    problem = image_problem()
    require("the node image", not problem, problem)
    node = NodeMachine.launch(tmp_path_factory.mktemp("node-machine"))
    try:
        yield node
    finally:
        node.stop()


async def _run(machine: NodeMachine, user: str, command: str) -> asyncssh.SSHCompletedProcess:
    known = asyncssh.import_known_hosts(
        f"[{machine.host}]:{machine.port} {machine.host_public_key()}\n"
    )
    async with asyncssh.connect(
        machine.host,
        machine.port,
        username=user,
        client_keys=[str(machine.client_key_path)],
        known_hosts=known,
    ) as conn:
        return await conn.run(command, check=False)


@pytest.mark.parametrize("user", ["root", NODE_USER])
async def test_reached_over_its_sshd_with_python3_and_no_vendetta(
    machine: NodeMachine, user: str
) -> None:
    result = await _run(
        machine,
        user,
        "id -un; python3 -c 'import sys, venv; print(sys.version_info >= (3, 11))'; "
        "command -v vendetta vendetta-agent || echo no-vendetta",
    )
    assert result.exit_status == 0, result.stderr
    assert str(result.stdout).split() == [user, "True", "no-vendetta"]


async def test_it_has_no_network_but_loopback(machine: NodeMachine) -> None:
    result = await _run(machine, "root", "ip -o link show | awk -F': ' '{print $2}'")
    assert str(result.stdout).split() == ["lo"]
