"""Faults of a node behind a real sshd while calls are in flight (issue 15, defects 1, 2, 5a).

- The node's agent is SIGKILLed during an `up`: the `up` ends with a clear error,
  the node is `ready` again within a deadline (the agent restarted by the next
  connect), and a retried `up` succeeds.
- The node falls silent (sshd and its connections SIGSTOPped; or, for another
  node, a proxy in front of its sshd stops forwarding either way, as behind
  iptables DROP: the TCP connections stay open) while an `up`, an `exec` and a
  `logs -f` are in flight: each ends within about the node's grace with an error
  naming the node (never the coordinator's "start it" hint), the workspace shows
  `unknown`, and once the node is back it converges (reconciler) and `up` works.
- The coordinator itself is wedged (SIGSTOP): a CLI call ends with a clear error
  instead of hanging.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import TEST_IMAGE
from tests.support.cli import BIN, Env, wait_for
from tests.support.fault_proxy import PausableProxy
from tests.support.member_node import member_env
from tests.support.node_user import MEMBER, owner_of

pytestmark = [pytest.mark.e2e, pytest.mark.docker, pytest.mark.sshd]

GRACE = 3  # the node's own grace period, in seconds
# An in-flight call ends within the grace, a heartbeat and some slack once its node is gone.
ENDS_WITHIN = GRACE + 5 + 15


class Bg:
    """A CLI command in the background, its combined output in a file."""

    def __init__(self, e: Env, name: str, *args: str) -> None:
        self.path = e.home / f"bg-{name}.out"
        self.args = args
        with self.path.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(BIN / "vendetta"), *args],
                env=e.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def output(self) -> str:
        return " ".join(self.path.read_text(errors="replace").split())

    def ended(self) -> bool:
        return self.proc.poll() is not None

    def show(self) -> str:
        state = "running" if self.proc.poll() is None else f"exited {self.proc.returncode}"
        return f"vendetta {' '.join(self.args)}: {state}; output: {self.output()}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def error_of(call: Bg) -> str:
    """What the command said after `error:` (not its progress lines)."""
    out = call.output()
    assert "error:" in out, call.show()
    return out.split("error:", 1)[1]


def write_config(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def config(e: Env, name: str, setup: str) -> Path:
    return write_config(
        e.home / name / ".vendetta" / "config.yaml",
        f"name: {name}\nprovider: docker\ndocker:\n  image: '{TEST_IMAGE}'\n"
        "  command: [/bin/sh, -c, 'while :; do sleep 1; done']\n"
        f"hooks:\n  setup: {setup!r}\n",
    )


# The setup hook takes long on the first `up` only: a retried `up` is quick.
SLOW_ONCE = "test -f /tmp/once || { touch /tmp/once; sleep 60; }"


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    """nf: a node behind sshd; np: another behind a pausable proxy in front of its sshd.
    Both reached as MEMBER (not root), whose agents run as that user."""
    with member_env("vd-fault-") as (e, m):
        m.sshd("nf", "127.0.0.31")
        behind = m.sshd("np", "127.0.0.33")
        PROXIES["np"] = proxy = PausableProxy.start("127.0.0.32", behind.host, behind.port)
        try:
            e.cli("server", "start")
            m.add("nf", e.nodes["nf"], "--grace", str(GRACE))
            m.add("np", behind, "--grace", str(GRACE), via=proxy)
            yield e
        finally:
            proxy.stop()


PROXIES: dict[str, PausableProxy] = {}
# How a node falls silent, and how it comes back.
SILENCES: dict[str, tuple[Callable[[Env], None], Callable[[Env], None]]] = {
    # sshd and its connections SIGSTOPped: the kernel still takes what is sent.
    "nf": (lambda e: e.nodes["nf"].freeze(), lambda e: e.nodes["nf"].thaw()),
    # Nothing forwarded either way: buffers fill, writes stall, as behind iptables DROP.
    "np": (lambda e: PROXIES["np"].pause(), lambda e: PROXIES["np"].resume()),
}


def agent_pid(e: Env) -> int:
    """The node's agent's pid (0 while there is none)."""
    (agent_dir,) = (d for d in e.agent_dirs if d.name == "nf")
    try:
        return int((agent_dir / "agent.pid").read_text().split()[0])
    except (FileNotFoundError, IndexError, ValueError):
        return 0


def test_agent_killed_during_up_node_comes_back_and_up_is_retried(env: Env) -> None:
    e = env
    e.cli(
        "workspace", "create", "fk1", "--remote", "nf", "--config", str(config(e, "fk", SLOW_ONCE))
    )
    pid = agent_pid(e)
    assert owner_of(pid) == MEMBER  # the node's SSH user, not root
    up = Bg(e, "kill-up", "workspace", "up", "fk1")
    try:
        wait_for("the setup hook to run", lambda: "setup hook" in up.output(), 60, up.show)
        os.kill(pid, signal.SIGKILL)
        wait_for("the up to end", up.ended, ENDS_WITHIN, up.show)
        assert up.proc.returncode != 0, up.show()
        said = error_of(up)
        assert "'nf'" in said and "workspace up fk1" in said, up.show()
        assert "server start" not in said and "Traceback" not in said, up.show()
        print(f"up after the agent's SIGKILL: {said.strip()}")
    finally:
        up.stop()
    # The next connect starts the agent again: the node is back, not stuck disconnected.
    wait_for(
        "a new agent and the node ready",
        lambda: agent_pid(e) not in (0, pid) and e.node("nf")["state"] == "NODE_STATE_READY",
        within=60,
        show=lambda: e.node("nf"),
    )
    assert owner_of(agent_pid(e)) == MEMBER
    e.cli("workspace", "up", "fk1")
    assert e.workspace("fk1")["state"] == "WORKSPACE_STATE_RUNNING"


@pytest.mark.parametrize("node", list(SILENCES))
def test_silent_node_ends_in_flight_calls_then_converges(env: Env, node: str) -> None:
    e = env
    slow, quick = f"{node}s1", f"{node}s2"
    cut_off, back = SILENCES[node]
    e.cli(
        "workspace", "create", slow, "--remote", node, "--config", str(config(e, slow, SLOW_ONCE))
    )
    e.cli("workspace", "create", quick, "--remote", node, "--config", str(config(e, quick, "true")))
    e.cli("workspace", "up", quick)
    e.wait_node(node, "ready", within=60)
    up = Bg(e, f"silent-up-{node}", "workspace", "up", slow)
    ex = Bg(
        e, f"silent-exec-{node}", "workspace", "exec", quick, "--", "sh", "-c", "echo hi; sleep 120"
    )
    logs = Bg(e, f"silent-logs-{node}", "workspace", "logs", quick, "-f")
    calls = (up, ex, logs)
    try:
        wait_for("the setup hook to run", lambda: "setup hook" in up.output(), 60, up.show)
        wait_for("exec's first line", lambda: "hi" in ex.output(), 30, ex.show)
        cut_off(e)
        for call in calls:
            wait_for("the call to end", call.ended, ENDS_WITHIN, call.show)
            assert call.proc.returncode != 0, call.show()
            said = error_of(call)
            assert f"'{node}'" in said, call.show()
            assert "server start" not in said and "Traceback" not in said, call.show()
        assert f"workspace up {slow}" in error_of(up), up.show()
        for call in calls:
            print(f"vendetta {' '.join(call.args)}: {error_of(call).strip()}")
        e.wait_node(node, "disconnected", within=30)
        assert e.workspace(slow)["state"] == "WORKSPACE_STATE_UNKNOWN"
        # A call made now says the node is unreachable, not that the coordinator is down.
        said = e.fails("workspace", "up", quick)
        assert node in said and "server start" not in said, said
    finally:
        for call in calls:
            call.stop()
        back(e)
    e.wait_node(node, "ready", within=60)
    # The reconciler finds out what became of the interrupted `up`: the environment runs.
    wait_for(
        f"{slow} to converge",
        lambda: e.workspace(slow)["state"] == "WORKSPACE_STATE_RUNNING",
        within=60,
        show=lambda: e.workspace(slow),
    )
    e.cli("workspace", "up", slow)
    assert e.cli("workspace", "exec", slow, "--", "echo", "back").stdout == "back\n"


def test_a_wedged_coordinator_does_not_hang_the_cli(env: Env) -> None:
    """A stream already open (keepalive pings go unanswered) and a new call both end."""
    e = env
    ticking = write_config(
        e.home / "fw" / ".vendetta" / "config.yaml",
        f"name: fw\nprovider: docker\ndocker:\n  image: '{TEST_IMAGE}'\n"
        "  command: [/bin/sh, -c, 'while :; do echo tick; sleep 0.5; done']\n",
    )
    e.cli("workspace", "create", "fw1", "--remote", "nf", "--config", str(ticking))
    e.cli("workspace", "up", "fw1")
    pid = int((e.home / "coord" / "coordinator.pid").read_text().split()[0])
    follow = Bg(e, "wedged-logs", "workspace", "logs", "fw1", "-f")
    calls = [follow]
    try:
        # The stream is open once lines come (a fixed 1 s could end before the CLI had
        # even started on a busy machine: then only a new call met the wedge).
        wait_for("logs -f to stream", lambda: "tick" in follow.output(), 60, follow.show)
        os.kill(pid, signal.SIGSTOP)
        calls.append(Bg(e, "wedged-list", "workspace", "list"))
        for call in calls:
            wait_for("the CLI to give up", call.ended, 60, call.show)
            assert call.proc.returncode != 0, call.show()
            said = error_of(call)
            assert "coordinator" in said and "Traceback" not in said, call.show()
    finally:
        os.kill(pid, signal.SIGCONT)
        for call in calls:
            call.stop()
    e.cli("workspace", "list")
