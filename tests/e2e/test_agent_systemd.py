"""How the agent runs on a node that boots systemd: a `systemd --user` unit when the
node user lingers, else a detached process with a pid file.

The node is a separate machine (scripts/build-node-image.sh --systemd: Debian 12 with
systemd as init, logind, PAM sessions, no polkit), reached as the non-root user
vdnode over its own sshd. Without polkit vdnode cannot turn lingering on itself:
the agent falls back to a detached process and says why. Once root lets it linger,
the agent is a unit of its user manager: it outlives every SSH session of the user,
and its KillMode=process keeps what it started (a process put into its cgroup, as a
libvirt session daemon's QEMU would be) running when the agent stops and starts.
root may turn its own lingering on: the agent does, and `node remove --purge` turns
it off again.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import require
from tests.support.cli import Env, cli_env, wait_for
from tests.support.node_machine import NodeMachine, image_problem

pytestmark = [pytest.mark.e2e, pytest.mark.lxd]

IMAGE = "vendetta/node-debian12-systemd"
USER = "vdnode"
UNIT = "vendetta-agent.service"
STATE = f"/home/{USER}/.local/state/vendetta-agent"


@pytest.fixture(scope="module")
def machine() -> Iterator[tuple[Env, NodeMachine]]:
    problem = image_problem(IMAGE, "build-node-image.sh --systemd")
    require("the systemd node image", not problem, problem)
    with cli_env("vd-sd-") as e:
        e.cli("server", "start")
        m = NodeMachine.launch(e.home / "machine", user=USER, image=IMAGE)
        try:
            wait_for("systemd in the node", lambda: _booted(m), within=60)
            yield e, m
        finally:
            m.stop()


def _booted(m: NodeMachine) -> bool:
    out = subprocess.run(
        ["lxc", "exec", m.name, "--", "systemctl", "is-system-running"],
        capture_output=True, text=True, timeout=30, check=False,
    ).stdout.strip()  # fmt: skip
    return out in ("running", "degraded")


def _ssh(m: NodeMachine, command: str) -> subprocess.CompletedProcess[str]:
    """``command`` in a new SSH session of the node user (as the coordinator runs its own)."""
    return subprocess.run(
        ["ssh", "-i", str(m.client_key_path), "-p", str(m.port), "-o", "BatchMode=yes",
         "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
         "-o", "LogLevel=ERROR", f"{USER}@{m.host}", command],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def _user_systemctl(m: NodeMachine, *args: str) -> str:
    """systemctl --user of the node user, from outside its sessions (lxc exec as root)."""
    return subprocess.run(
        ["lxc", "exec", m.name, "--", "runuser", "-u", USER, "--", "env",
         "XDG_RUNTIME_DIR=/run/user/1000", "systemctl", "--user", *args],
        capture_output=True, text=True, timeout=60, check=False,
    ).stdout.strip()  # fmt: skip


def _add(e: Env, m: NodeMachine, name: str) -> None:
    added = e.cli(
        "node", "add", name, m.host, "--port", str(m.port), "--user", USER,
        "--identity", str(m.client_key_path), "--yes", timeout=600,
    )  # fmt: skip
    assert "added" in added.stdout and "ready" in added.stdout, added.stdout


def _rows(e: Env, name: str) -> dict[str, dict[str, Any]]:
    result = e.cli("node", "test", name, "--json", check=False)
    return {c["name"]: c for c in json.loads(result.stdout)["checks"] if not c.get("provider")}


def _agents(m: NodeMachine) -> list[int]:
    out = m.exec("sh", "-c", "grep -l 'nodeagent[.]main' /proc/[0-9]*/cmdline 2>/dev/null; true")
    return sorted(int(p.split("/")[2]) for p in out.split())


def _lingers(m: NodeMachine) -> bool:
    return m.exec("sh", "-c", f"test -e /var/lib/systemd/linger/{USER} && echo yes; true") != ""


def _end_sessions(m: NodeMachine) -> None:
    """End every login session of the node user (the coordinator's SSH connections too:
    one ended, the coordinator closes the other, which may then be gone already)."""
    out = m.exec("loginctl", "list-sessions", "--no-legend")
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == USER:
            m.exec("sh", "-c", f"loginctl terminate-session {fields[0]} 2>/dev/null; true")


def test_without_lingering_the_agent_runs_detached_and_says_why(
    machine: tuple[Env, NodeMachine],
) -> None:
    e, m = machine
    assert not _lingers(m)
    _add(e, m, "sd1")
    row = _rows(e, "sd1")["agent runs as"]
    assert row["ok"], row
    assert row["value"].startswith(f"detached process, pid file {STATE}/agent.pid"), row
    assert f"lingering is off for {USER} and could not be turned on" in row["value"], row
    assert f"sudo loginctl enable-linger {USER}" in row["value"], row
    pid = int(m.exec("cat", f"{STATE}/agent.pid"))
    assert _agents(m) == [pid]
    assert "No such file" in m.exec("sh", "-c", f"ls ~{USER}/.config/systemd/user 2>&1; true")
    e.cli("node", "remove", "sd1")
    wait_for("the detached agent to stop", lambda: _agents(m) == [], within=30)


def test_a_lingering_user_gets_a_unit_that_outlives_its_sessions(
    machine: tuple[Env, NodeMachine],
) -> None:
    e, m = machine
    m.exec("loginctl", "enable-linger", USER)  # as root: what the fallback's message says
    _add(e, m, "sd2")
    row = _rows(e, "sd2")["agent runs as"]
    assert row["value"] == f"systemd --user unit {UNIT} (lingering on)", row
    active = _ssh(m, f"XDG_RUNTIME_DIR=/run/user/$(id -u) systemctl --user is-active {UNIT}")
    assert active.stdout.strip() == "active", active
    assert _user_systemctl(m, "show", "-p", "KillMode", "--value", UNIT) == "process"
    assert _user_systemctl(m, "is-enabled", UNIT) == "enabled"  # back after a reboot
    main = int(_user_systemctl(m, "show", "-p", "MainPID", "--value", UNIT))
    assert _agents(m) == [main]
    assert int(m.exec("cat", f"{STATE}/agent.pid")) == main

    # Every session of the user ends (the coordinator's connection with them): the agent
    # stays, the coordinator comes back to the same agent process.
    _end_sessions(m)
    wait_for("the coordinator to reconnect", lambda: e.node("sd2")["state"] == "NODE_STATE_READY"
             and _rows(e, "sd2")["agent runs as"]["value"] == f"systemd --user unit {UNIT}",
             within=120)  # fmt: skip
    assert _user_systemctl(m, "is-active", UNIT) == "active"
    assert int(_user_systemctl(m, "show", "-p", "MainPID", "--value", UNIT)) == main

    # Something the agent's unit started outside environments (as QEMU under a session
    # libvirt): a process of the node user in the unit's cgroup, from a drop-in's
    # ExecStartPost. Stopping the agent, and starting it again, leaves it running.
    dropin = f"/home/{USER}/.config/systemd/user/{UNIT}.d"
    spawn = "sleep 1000 </dev/null >/dev/null 2>&1 & echo $! >/tmp/child"
    subprocess.run(
        ["lxc", "file", "push", "-", f"{m.name}{dropin}/child.conf", "--create-dirs",
         "--uid", "1000", "--gid", "1000"],
        input=f"[Service]\nExecStartPost=/bin/sh -c '{spawn}'\n", text=True, check=True,
        timeout=60,
    )  # fmt: skip
    m.exec("chown", f"{USER}:", dropin)
    _user_systemctl(m, "daemon-reload")
    _user_systemctl(m, "restart", UNIT)
    child = m.exec("cat", "/tmp/child").strip()
    cgroup = _user_systemctl(m, "show", "-p", "ControlGroup", "--value", UNIT)
    assert cgroup.endswith(f"/{UNIT}") and cgroup in m.exec("cat", f"/proc/{child}/cgroup")
    wait_for("node sd2 ready", lambda: e.node("sd2")["state"] == "NODE_STATE_READY", within=120)
    stopped = _ssh(m, ".local/share/vendetta/agent/*/bin/python -m nodeagent.main stop")
    assert stopped.stdout.strip() == "stopped", stopped
    assert _agents(m) == []
    assert m.exec("sh", "-c", f"test -d /proc/{child} && echo alive").strip() == "alive"
    assert "No such file" in m.exec(
        "sh", "-c", f"ls ~{USER}/.config/systemd/user/{UNIT} 2>&1; true"
    )
    _end_sessions(m)  # the coordinator reconnects and starts the unit again
    wait_for(
        "the unit again", lambda: _user_systemctl(m, "is-active", UNIT) == "active", within=120
    )
    wait_for("node sd2 ready", lambda: e.node("sd2")["state"] == "NODE_STATE_READY", within=120)
    assert m.exec("sh", "-c", f"test -d /proc/{child} && echo alive").strip() == "alive"
    m.exec("kill", child)
    m.exec("rm", "-r", dropin)

    removed = e.cli("node", "remove", "sd2", "--purge")
    assert "its agent and its state deleted" in removed.stdout, removed.stdout
    assert _agents(m) == []
    assert _user_systemctl(m, "is-active", UNIT) != "active"
    assert "No such file" in m.exec(
        "sh", "-c", f"ls ~{USER}/.config/systemd/user/{UNIT} 2>&1; true"
    )
    # Root turned lingering on, not vendetta: it stays on.
    assert _lingers(m)


def test_a_user_who_may_linger_gets_it_turned_on_and_off_again_by_purge(
    machine: tuple[Env, NodeMachine],
) -> None:
    e, m = machine
    linger = "test -e /var/lib/systemd/linger/root && echo yes; true"
    assert m.exec("sh", "-c", linger) == ""
    added = e.cli(
        "node", "add", "sd3", m.host, "--port", str(m.port), "--user", "root",
        "--identity", str(m.client_key_path), "--yes", timeout=600,
    )  # fmt: skip
    assert "ready" in added.stdout, added.stdout
    row = _rows(e, "sd3")["agent runs as"]
    assert row["value"] == f"systemd --user unit {UNIT} (lingering turned on by vendetta)", row
    assert m.exec("sh", "-c", linger).strip() == "yes"
    e.cli("node", "remove", "sd3", "--purge")
    assert m.exec("sh", "-c", linger) == ""
    assert "No such file" in m.exec("sh", "-c", f"ls /root/.config/systemd/user/{UNIT} 2>&1; true")
