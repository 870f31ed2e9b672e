"""The LXD provider's port bookkeeping: its proxy devices, and free ports on this host.

The devices and what LXD does with them are tested against the real daemon in
tests/integration/test_lxd_provider.py; here, what needs no LXD: reading the
devices back, choosing node ports with real sockets on the loopback, and what
a start does with LXD's refusals (a small fake of pylxd's API nodes).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pylxd.exceptions
import pytest

from common.loopback import free_ports, is_free
from providers.lxd import instances, ports
from providers.lxd.errors import SpawnError


@pytest.fixture
def squatter() -> Iterator[int]:
    """A port some other process listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def test_devices_are_read_back_as_status_ports() -> None:
    devices = {
        "vd-port-8080": ports.proxy_device(8080, 40001),
        "vd-port-5432": ports.proxy_device(5432, 40002),
        "root": {"type": "disk", "path": "/", "pool": "default"},
        "theirs": {"type": "proxy", "listen": "tcp:127.0.0.1:1", "connect": "tcp:127.0.0.1:2"},
        "vd-port-9": {"type": "proxy", "listen": "unix:/x", "connect": "tcp:127.0.0.1:9"},
    }
    assert ports.published(devices) == {5432: "127.0.0.1:40002", 8080: "127.0.0.1:40001"}
    assert ports.proxy_device(8080, 40001) == {
        "type": "proxy",
        "listen": "tcp:127.0.0.1:40001",
        "connect": "tcp:127.0.0.1:8080",
        "bind": "host",
    }


def test_free_ports_are_distinct_free_and_avoid_what_is_asked(squatter: int) -> None:
    chosen = free_ports(5)
    assert len(set(chosen)) == 5 and all(is_free(p) for p in chosen)
    assert squatter not in chosen and not is_free(squatter)
    avoided = free_ports(3, avoid=chosen)
    assert not set(avoided) & set(chosen)


def test_only_taken_node_ports_are_repicked(squatter: int) -> None:
    free = free_ports(1)[0]
    devices = {
        "vd-port-80": ports.proxy_device(80, squatter),
        "vd-port-81": ports.proxy_device(81, free),
    }
    moved = ports.repicked(devices)
    assert list(moved) == ["vd-port-80"]
    new = ports.ours(moved)[80]
    assert new not in (squatter, free) and is_free(new)
    everything = ports.repicked(devices, everything=True)
    assert set(everything) == {"vd-port-80", "vd-port-81"}
    assert not {squatter, free} & set(ports.ours(everything).values())
    assert ports.repicked({"vd-port-81": ports.proxy_device(81, free)}) == {}


def test_lxds_refusal_of_a_proxy_that_cannot_listen_is_recognised() -> None:
    # What LXD 5.0 answers when a proxy device's listen address is taken at start.
    refusal = (
        "Error occurred when starting proxy device: Error: Failed to listen on "
        "127.0.0.1:46755: listen tcp 127.0.0.1:46755: bind: address already in use"
    )
    assert ports.is_listen_failure(refusal)
    # The same under load, in a clean-clone CI run: forkproxy's listener gone first.
    assert ports.is_listen_failure(
        "Error occurred when starting proxy device: Error: Failed to receive fd from "
        "listener process: Failed to receive file descriptor via abstract unix socket"
    )
    assert not ports.is_listen_failure("Failed to run: forkstart: container failed to start")


class _Response:
    def __init__(self, body: dict[str, object], status_code: int = 200) -> None:
        self._body = body
        self.status_code = status_code

    def json(self) -> dict[str, object]:
        return self._body


class _Node:
    """pylxd's API node for one stopped instance whose first STARTS starts abort."""

    def __init__(self, aborts: int) -> None:
        self.aborts = aborts
        self.starts = 0
        self.state = self

    def get(self) -> _Response:
        return _Response({"metadata": {"devices": {}}})

    def put(self, json: dict[str, object]) -> _Response:
        assert json == {"action": "start"}
        self.starts += 1
        return _Response({"operation": f"op-{self.starts}"})


class _Client:
    def __init__(self, node: _Node) -> None:
        self.node = node
        self.api = self
        self.instances = {"vd-w": node}
        self.operations = self

    def wait_for_operation(self, operation: str) -> None:
        if self.node.starts <= self.node.aborts:
            err = (
                "Failed to run: /usr/bin/lxd forkstart vd-w /var/lib/lxd/containers "
                "/var/log/lxd/vd-w/lxc.conf: exit status 1"
            )
            raise pylxd.exceptions.LXDAPIException(_Response({"metadata": {"err": err}}))


def test_an_aborted_lxc_spawn_is_started_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """What failed a clean-clone CI run once: LXC's spawn aborting under load
    ("Sync wait failure" in the instance's lxc.log), nothing wrong with it."""
    monkeypatch.setattr(instances, "SPAWN_RETRY_PAUSE", 0)
    node = _Node(aborts=instances.START_ATTEMPTS - 1)
    instances.start_publishing(_Client(node), "unix:lxd", "starting 'w'", "vd-w")
    assert node.starts == instances.START_ATTEMPTS
    # One abort too many: the start fails, saying where LXC's own log is.
    node = _Node(aborts=instances.START_ATTEMPTS)
    with pytest.raises(SpawnError, match=r"forkstart .*lxc info --show-log vd-w"):
        instances.start_publishing(_Client(node), "unix:lxd", "starting 'w'", "vd-w")
    assert node.starts == instances.START_ATTEMPTS
    assert ports.is_spawn_failure("Failed to run: forkstart: container failed to start")
    assert not ports.is_spawn_failure("Error occurred when starting proxy device: ...")
