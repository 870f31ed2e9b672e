"""An LXD workspace on a node reached over a real sshd, through coordinator and
agent: its service port on the user's machine (LXD proxy devices on the
node's loopback, forwarded by the coordinator), again after a restart with
the node port taken meanwhile; a TCP health check that a proxy cannot fool;
and an interactive terminal through the same stream `workspace connect` opens.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc.aio
import pytest

from tests.conftest import LXD_TEST_IMAGE
from tests.support.cli import Env, cli_env
from tests.support.squat import try_bind
from tests.support.sshd import SshServer
from vendetta.v1 import common_pb2, coordinator_pb2_grpc

pytestmark = [pytest.mark.e2e, pytest.mark.lxd, pytest.mark.sshd]

SECTION = f"provider: lxd\nlxd: {{image: '{LXD_TEST_IMAGE}'}}\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fetch(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
        return str(r.read().decode())


def config(e: Env, name: str, body: str) -> str:
    path = e.home / name / ".vendetta" / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"name: {name}\n{SECTION}{body}")
    return str(path)


@pytest.fixture(scope="module")
def remote() -> Iterator[tuple[Env, int]]:
    port = free_port()
    with cli_env(prefix="vd-lxdws-") as e:
        e.nodes["n1"] = SshServer.start(e.home / "sshd", host="127.0.0.10")
        e.cli("server", "start")
        e.add_node("n1", e.nodes["n1"])
        web = (
            "services:\n  web:\n    command: >-\n"
            '      mkdir -p /www && echo "hello from lxd" > /www/index.html'
            f" && exec httpd -f -p {port} -h /www\n"
            f"    port: {port}\n    health_check: {{http: /, interval: 0.3}}\n"
        )
        cfg = config(e, "site", web)
        e.cli("workspace", "create", "lsite", "--remote", "n1", "--config", cfg)
        yield e, port


def squat(port: int, within: float = 60) -> socket.socket:
    """Listen on ``port`` of the node's loopback, as another program would.

    LXD's forkproxy may go on listening for a moment after a stop returns (as
    tests/integration/test_lxd_provider.py's squat() waits for too): bind once it let go.
    """
    deadline = time.monotonic() + within
    while (squatter := try_bind(port)) is None:
        if time.monotonic() > deadline:
            raise OSError(f"port {port} stayed taken")
        time.sleep(0.1)
    return squatter


def ports(e: Env, ws: str) -> dict[str, dict[str, object]]:
    return {r["service"]: r for r in json.loads(e.cli("workspace", "ports", ws, "--json").stdout)}


def test_service_port_is_on_the_users_machine(remote: tuple[Env, int]) -> None:
    e, port = remote
    up = e.cli("workspace", "up", "lsite")
    assert f"http://localhost:{port}" in up.stdout  # the summary says where
    assert fetch(port) == "hello from lxd\n"  # the CLI has exited: the coordinator forwards
    row = ports(e, "lsite")["web"]
    assert row["local_address"] == f"localhost:{port}"
    assert str(row["node_endpoint"]).startswith("127.0.0.1:")  # the node's loopback only


def test_a_restart_with_the_node_port_taken_publishes_it_again(remote: tuple[Env, int]) -> None:
    e, port = remote
    before = ports(e, "lsite")["web"]
    node_port = int(str(before["node_endpoint"]).rpartition(":")[2])
    e.cli("workspace", "down", "lsite")
    with pytest.raises(OSError):
        fetch(port)  # gone with down
    with squat(node_port):  # something on the node takes the node port
        e.cli("workspace", "up", "lsite")
        after = ports(e, "lsite")["web"]
        assert after["node_endpoint"] != before["node_endpoint"]
        assert after["local_address"] == f"localhost:{port}"  # the same on the user's side
        assert fetch(port) == "hello from lxd\n"  # reaches the workspace, not the squatter


def test_a_tcp_health_check_is_not_fooled_by_the_proxy(remote: tuple[Env, int]) -> None:
    """The proxy accepts connections even when nothing listens inside: checks go inside."""
    e, _ = remote
    mute = free_port()
    body = (
        f"services:\n  mute:\n    command: 'echo not listening; while :; do sleep 1; done'\n"
        f"    port: {mute}\n    restart: 'no'\n"
        f"    health_check: {{tcp: {mute}, interval: 0.2, retries: 3}}\n"
    )
    e.cli("workspace", "create", "lmute", "--remote", "n1", "--config", config(e, "mute", body))
    out = e.fails("workspace", "up", "lmute")
    assert "mute: failed" in out and "refuses connections" in out, out
    e.cli("workspace", "destroy", "lmute")


async def test_interactive_terminal_through_the_coordinator(remote: tuple[Env, int]) -> None:
    """The stream `workspace connect` opens: keys, output, resizes and the exit code."""
    e, _ = remote
    e.cli("workspace", "up", "lsite")
    sock = f"unix:{Path(e.env['VENDETTA_HOME']) / 'coordinator.sock'}"
    queue: asyncio.Queue[common_pb2.AttachInput | None] = asyncio.Queue()

    async def requests() -> AsyncIterator[common_pb2.AttachInput]:
        size = common_pb2.TerminalSize(rows=30, cols=120)
        yield common_pb2.AttachInput(
            start=common_pb2.AttachStart(workspace="lsite", tty=True, size=size)
        )
        while (msg := await queue.get()) is not None:
            yield msg

    out = bytearray()
    codes: list[int] = []

    async def read(channel: grpc.aio.Channel) -> None:
        async for o in coordinator_pb2_grpc.CoordinatorStub(channel).Connect(requests()):
            kind = o.WhichOneof("output")
            if kind == "stdout":
                out.extend(o.stdout)
            elif kind == "exit_code":
                codes.append(o.exit_code)

    async def shows(text: str, within: float = 30) -> bool:
        deadline = time.monotonic() + within
        while text.encode() not in out:
            if reader.done():
                reader.result()
                pytest.fail(f"the session ended before {text!r}:\n{out.decode()}")
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def type_(text: str) -> None:
        queue.put_nowait(common_pb2.AttachInput(stdin=text.encode()))

    async with grpc.aio.insecure_channel(sock) as channel:
        reader = asyncio.create_task(read(channel))
        try:
            type_("echo hello-$((6*7)) $TERM; stty size\n")
            assert await shows("hello-42 xterm") and await shows("30 120"), out.decode()
            for rows, cols in ((20, 100), (40, 160)):
                queue.put_nowait(
                    common_pb2.AttachInput(resize=common_pb2.TerminalSize(rows=rows, cols=cols))
                )
                # The resize and the keys travel apart: ask again, for up to a minute
                # (five tries of 2 s were short on a busy machine).
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    type_("stty size\n")
                    if await shows(f"{rows} {cols}", within=2):
                        break
                assert f"{rows} {cols}".encode() in out, out.decode()
            type_("exit 5\n")
            await asyncio.wait_for(reader, 30)
            assert codes == [5]
        finally:
            queue.put_nowait(None)
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)


def test_destroy_leaves_no_instance(remote: tuple[Env, int]) -> None:
    e, port = remote
    env_id = e.workspace("lsite")["environment_id"]
    e.cli("workspace", "destroy", "lsite")
    listed = subprocess.run(
        ["lxc", "list", "--format", "csv", "-c", "n"], capture_output=True, text=True, check=True
    ).stdout
    assert env_id and env_id not in listed
    with pytest.raises(OSError):
        fetch(port)
