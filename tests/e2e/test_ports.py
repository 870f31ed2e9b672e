"""Service ports on the user's machine through the coordinator, for a Docker
workspace on a node reached over a real sshd: forwarded, announced when
shifted, back after the SSH connection drops, gone after down.
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.request
from collections.abc import Iterator

import pytest

from tests.conftest import TEST_IMAGE
from tests.support.cli import Env, cli_env
from tests.support.sshd import SshServer

pytestmark = [pytest.mark.e2e, pytest.mark.docker, pytest.mark.sshd]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fetch(port: int, path: str = "/") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return str(r.read().decode())


def eventually_fetch(port: int, within: float = 60) -> str:
    deadline = time.monotonic() + within
    while True:
        try:
            return fetch(port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.fixture(scope="module")
def remote() -> Iterator[tuple[Env, int]]:
    port = free_port()
    with cli_env(prefix="vd-ports-") as e:
        e.nodes["n1"] = SshServer.start(e.home / "sshd", host="127.0.0.7")
        e.cli("server", "start")
        e.add_node("n1", e.nodes["n1"])
        cfg = e.home / "site" / ".vendetta" / "config.yaml"
        cfg.parent.mkdir(parents=True)
        cfg.write_text(
            f"name: site\nprovider: docker\ndocker: {{image: '{TEST_IMAGE}'}}\nservices:\n"
            f'  web:\n    command: >-\n      mkdir -p /www && echo "hello from $(hostname)"'
            f" > /www/index.html && exec httpd -f -p {port} -h /www\n"
            f"    port: {port}\n    health_check: {{http: /, interval: 0.3}}\n"
        )
        yield e, port


def ports(e: Env, ws: str) -> dict[str, dict[str, object]]:
    return {r["service"]: r for r in json.loads(e.cli("workspace", "ports", ws, "--json").stdout)}


def test_service_port_is_on_the_users_machine(remote: tuple[Env, int]) -> None:
    e, port = remote
    e.cli(
        "workspace",
        "create",
        "site1",
        "--remote",
        "n1",
        "--config",
        str(e.home / "site/.vendetta/config.yaml"),
    )
    up = e.cli("workspace", "up", "site1")
    assert f"http://localhost:{port}" in up.stdout  # the summary says where
    # the CLI has exited: the forward belongs to the coordinator
    assert fetch(port) == "hello from site1\n"
    assert ports(e, "site1")["web"]["local_address"] == f"localhost:{port}"


def test_a_taken_port_is_shifted_and_announced(remote: tuple[Env, int]) -> None:
    e, port = remote
    e.cli(
        "workspace",
        "create",
        "site2",
        "--remote",
        "n1",
        "--config",
        str(e.home / "site/.vendetta/config.yaml"),
    )
    up = e.cli("workspace", "up", "site2")
    assert f"port {port} is taken on this machine" in up.stdout + up.stderr
    row = ports(e, "site2")["web"]
    other = int(str(row["local_address"]).rpartition(":")[2])
    assert other != port and "taken" in str(row["note"])
    assert fetch(other) == "hello from site2\n"
    assert fetch(port) == "hello from site1\n"  # both at once, each its own
    # the choice is kept for the next up
    e.cli("workspace", "down", "site2")
    with pytest.raises(OSError):
        fetch(other)  # gone with down
    e.cli("workspace", "up", "site2")
    assert ports(e, "site2")["web"]["local_address"] == f"localhost:{other}"
    assert fetch(other) == "hello from site2\n"
    e.cli("workspace", "destroy", "site2")


def test_forward_comes_back_after_the_ssh_connection_drops(remote: tuple[Env, int]) -> None:
    e, port = remote
    e.nodes["n1"].kill_connections()  # every SSH connection to the node dies
    assert eventually_fetch(port) == "hello from site1\n"
    assert e.node("n1")["state"] == "NODE_STATE_READY"


def test_a_pinned_local_port_that_is_taken_is_an_error_naming_its_holder(
    remote: tuple[Env, int],
) -> None:
    e, port = remote
    pinned = free_port()
    cfg = e.home / "pinned" / ".vendetta" / "config.yaml"
    cfg.parent.mkdir(parents=True)
    text = (e.home / "site/.vendetta/config.yaml").read_text()
    cfg.write_text(
        text.replace(f"    port: {port}\n", f"    port: {port}\n    local_port: {pinned}\n")
    )
    e.cli("workspace", "create", "site3", "--remote", "n1", "--config", str(cfg))
    holder = socket.socket()
    holder.bind(("127.0.0.1", pinned))
    holder.listen()
    try:
        out = e.fails("workspace", "up", "site3")
        assert f"port {pinned}" in out and f"pid {os.getpid()}" in out, out
        assert "local_port" in out
        # nothing was started
        assert e.workspace("site3")["state"] == "WORKSPACE_STATE_STOPPED"
    finally:
        holder.close()
    # once free, the pinned port is used as it is (no shift), and kept on the next up
    e.cli("workspace", "up", "site3")
    assert ports(e, "site3")["web"]["local_address"] == f"localhost:{pinned}"
    assert fetch(pinned) == "hello from site3\n"
    e.cli("workspace", "destroy", "site3")
