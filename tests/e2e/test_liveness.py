"""Liveness end to end: a node behind a real sshd is cut off, turns `disconnected`
after its grace period (its workspaces `unknown`, nothing destroyed, the other
node untouched), and when it is back turns `ready`, its workspace is reconciled
(the same environment, not a new one) and its published port answers again on
the same local port. `node list --watch --json` runs the whole time and shows
both transitions.

The agent on the node outlives the cut (it runs detached, not under sshd), as
it would on a real machine whose network went away: its workspace and service
keep running.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TEST_IMAGE
from tests.support.cli import BIN, Env, cli_env, wait_for
from tests.support.sshd import SshServer

pytestmark = [pytest.mark.e2e, pytest.mark.docker, pytest.mark.sshd]

GRACE = 3  # n1's own grace period, in seconds
HEARTBEAT = 5  # coordinator.nodes.HEARTBEAT_INTERVAL (a heartbeat may be under way)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fetch(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
        return str(r.read().decode())


def answers(port: int) -> str | None:
    try:
        return fetch(port)
    except OSError:
        return None


class Watch:
    """`vendetta node list --watch --json` in the background, its lines in a file."""

    def __init__(self, e: Env, name: str) -> None:
        self.path = e.home / f"watch-{name}.jsonl"
        self.err = e.home / f"watch-{name}.err"
        with self.path.open("wb") as out, self.err.open("wb") as err:
            self.proc = subprocess.Popen(
                [str(BIN / "vendetta"), "node", "list", "--watch", "--json"],
                env=e.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )

    def events(self) -> list[dict[str, Any]]:
        # Complete lines only: the watch may be half way through writing the last one.
        text = self.path.read_text()
        lines = text[: text.rfind("\n") + 1].splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def of(self, node: str) -> list[dict[str, Any]]:
        return [ev for ev in self.events() if ev["node"]["name"] == node]

    def states(self, node: str) -> list[str]:
        """The node's states, each change once."""
        out: list[str] = []
        for ev in self.of(node):
            state = ev["node"]["state"].removeprefix("NODE_STATE_").lower()
            if not out or out[-1] != state:
                out.append(state)
        return out

    def show(self) -> str:
        alive = "running" if self.proc.poll() is None else f"exited {self.proc.returncode}"
        return f"watch {alive}; stdout:\n{self.path.read_text()}\nstderr:\n{self.err.read_text()}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def write_config(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Env, int]]:
    """n1 (grace 3 s) with a running workspace publishing `port`; n2 with one of its own."""
    port = free_port()
    with cli_env(prefix="vd-live-") as e:
        e.nodes["n1"] = SshServer.start(e.home / "sshd1", host="127.0.0.8")
        e.nodes["n2"] = SshServer.start(e.home / "sshd2", host="127.0.0.9")
        e.cli("server", "start")
        e.add_node("n1", e.nodes["n1"], "--grace", str(GRACE))
        e.add_node("n2", e.nodes["n2"])
        web = write_config(
            e.home / "web" / ".vendetta" / "config.yaml",
            f"name: web\nprovider: docker\ndocker: {{image: '{TEST_IMAGE}'}}\nservices:\n"
            f'  web:\n    command: >-\n      mkdir -p /www && echo "hello from $(hostname)"'
            f" > /www/index.html && exec httpd -f -p {port} -h /www\n"
            f"    port: {port}\n    health_check: {{http: /, interval: 0.3}}\n",
        )
        other = write_config(
            e.home / "other" / ".vendetta" / "config.yaml",
            f"name: other\nprovider: docker\ndocker:\n  image: '{TEST_IMAGE}'\n"
            "  command: [/bin/sh, -c, 'while :; do sleep 1; done']\n",
        )
        e.cli("workspace", "create", "live1", "--remote", "n1", "--config", str(web))
        e.cli("workspace", "create", "other1", "--remote", "n2", "--config", str(other))
        e.cli("workspace", "up", "live1")
        e.cli("workspace", "up", "other1")
        assert fetch(port) == "hello from live1\n"
        yield e, port


# How a node is cut off, and how it comes back.
CUTS: dict[str, tuple[Callable[[SshServer], None], Callable[[SshServer], None]]] = {
    # sshd and every connection it serves are gone: the connection drops at once.
    "sshd-stopped": (SshServer.stop, SshServer.restart),
    # Nothing answers any more, but the connection stays open (heartbeats time out)
    # and new connections hang: what a network that drops the traffic looks like.
    "node-silent": (SshServer.freeze, SshServer.thaw),
}


@pytest.mark.parametrize("how", list(CUTS))
def test_a_node_cut_off_is_disconnected_then_back_with_its_workspace_and_ports(
    cluster: tuple[Env, int], how: str
) -> None:
    e, port = cluster
    n1 = e.nodes["n1"]
    cut_off, back = CUTS[how]
    before = e.workspace("live1")
    assert before["state"] == "WORKSPACE_STATE_RUNNING", before
    assert e.node("n1")["grace_seconds"] == GRACE

    watch = Watch(e, how)
    try:
        wait_for(
            "the watch's first picture",
            lambda: {"n1", "n2"} <= {ev["node"]["name"] for ev in watch.events()},
            within=30,
            show=watch.show,
        )

        # The agent, its workspace and service keep running on the node meanwhile.
        cut_off(n1)
        cut = time.monotonic()
        e.wait_node("n1", "disconnected", within=GRACE + HEARTBEAT + 10)
        took = time.monotonic() - cut
        # The watch is another process writing to a file: it may trail `node list`.
        gone = wait_for(
            "the watch to show n1 disconnected",
            lambda: [
                ev for ev in watch.of("n1") if ev["node"]["state"] == "NODE_STATE_DISCONNECTED"
            ],
            within=15,
            show=watch.show,
        )
        assert gone[0]["message"].startswith(f"no answer for {GRACE} s"), watch.show()
        ws = e.workspace("live1")
        assert ws["state"] == "WORKSPACE_STATE_UNKNOWN", ws
        assert ws["environment_id"] == before["environment_id"]
        # The other node and its workspace are untouched.
        assert e.node("n2")["state"] == "NODE_STATE_READY"
        assert e.workspace("other1")["state"] == "WORKSPACE_STATE_RUNNING"
        # Without its tunnel the forward is down (nothing was stopped or destroyed).
        wait_for(f"port {port} to stop answering", lambda: answers(port) is None, within=15)

        back(n1)
        e.wait_node("n1", "ready", within=60)
        # Reconciled, not recreated: the same environment, running again, its service's
        # forward back on the same local port.
        wait_for(
            "live1 running again",
            lambda: e.workspace("live1")["state"] == "WORKSPACE_STATE_RUNNING",
            within=30,
            show=lambda: e.workspace("live1"),
        )
        after = e.workspace("live1")
        assert after["environment_id"] == before["environment_id"], (before, after)
        assert wait_for(f"port {port} answering again", lambda: answers(port), within=30) == (
            "hello from live1\n"
        )
        ports = json.loads(e.cli("workspace", "ports", "live1", "--json").stdout)
        assert [p["local_address"] for p in ports] == [f"localhost:{port}"], ports

        wait_for(
            "the watch to show n1 back",
            lambda: watch.states("n1") == ["ready", "disconnected", "ready"],
            within=15,
            show=watch.show,
        )
        # n2: its first line only (no change, no message, while n1 came and went).
        assert len(watch.of("n2")) == 1, watch.show()
        assert watch.of("n2")[0]["node"]["state"] == "NODE_STATE_READY"
        assert e.workspace("other1")["state"] == "WORKSPACE_STATE_RUNNING"
        print(f"{how}: n1 disconnected {took:.1f} s after the cut (grace {GRACE} s)")
    finally:
        watch.stop()
        back(n1)  # for what follows, if the test stopped half-way
