"""How `vendetta-agent ensure` decides between a `systemd --user` unit and a detached
process, the unit it writes, and `node upgrade` deciding from a fresh Info."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from common import agent_unit
from common.agent_unit import Facts, decide
from nodeagent import servicer
from tests.support.fakes import Cluster

LINGERING = Facts(systemd_init=True, manager="252.39-1~deb12u2", linger=True, user="dev")


def test_a_unit_when_lingering_is_on_and_the_user_manager_answers() -> None:
    plan = decide(LINGERING)
    assert plan.unit and plan.why == "lingering on"
    now = decide(Facts(**{**LINGERING.__dict__, "linger_enabled_now": True}))
    assert now.unit and now.why == "lingering turned on by vendetta"


@pytest.mark.parametrize(
    ("facts", "why"),
    [
        (Facts(forced_detached=True), "VENDETTA_AGENT_RUNNER=detached"),
        (Facts(), "systemd is not the node's init"),
        (
            Facts(systemd_init=True, user="dev", linger_error="loginctl enable-linger: denied"),
            "lingering is off for dev and could not be turned on (loginctl enable-linger: "
            "denied): a user unit would stop with its last session (`sudo loginctl "
            "enable-linger dev` lets the agent run as a unit)",
        ),
        (
            Facts(systemd_init=True, linger=True, manager_error="Failed to connect to bus"),
            "no systemd user manager answers (Failed to connect to bus)",
        ),
        (
            Facts(systemd_init=True, linger=True, manager="239"),
            "the user's systemd 239 is older than 240",
        ),
    ],
    ids=["forced", "no-systemd", "no-linger", "no-manager", "old-systemd"],
)
def test_detached_otherwise_saying_why(facts: Facts, why: str) -> None:
    plan = decide(facts)
    assert not plan.unit and plan.why == why


def test_unit_names_the_default_folder_plainly_others_by_digest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VENDETTA_AGENT_DIR", str(tmp_path / "default"))
    assert agent_unit.unit_name(tmp_path / "default") == "vendetta-agent.service"
    other = agent_unit.unit_name(tmp_path / "other")
    assert other.startswith("vendetta-agent-") and other.endswith(".service")
    assert other != agent_unit.unit_name(tmp_path / "third")


def _directive(text: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(f"{key}=")]


def test_the_unit_runs_the_agent_alone_with_the_sessions_environment(tmp_path: Path) -> None:
    argv = ["/h/o m/.local/share/vendetta/agent/1+ab/bin/python", "-m", "nodeagent.main",
            "--dir", "/s/100%$x", "run"]  # fmt: skip
    env = {"PATH": "/snap/bin:/usr/bin", "DOCKER_HOST": "unix:///d.sock", "SECRET": "no",
           "VENDETTA_QEMU_STATE_DIR": '/q "x"', "XDG_DATA_HOME": "/h/data"}  # fmt: skip
    text = agent_unit.render(argv, env, tmp_path / "agent.log", tmp_path)
    # Restarts and upgrades must not end what the agent started (QEMU of a session libvirt).
    assert _directive(text, "KillMode") == ["process"]
    assert _directive(text, "Restart") == ["on-failure"]
    assert _directive(text, "WantedBy") == ["default.target"]
    (exec_start,) = _directive(text, "ExecStart")
    # systemd's quoting: % doubled (specifiers), $ doubled (variables), quotes escaped.
    assert exec_start == (
        '"/h/o m/.local/share/vendetta/agent/1+ab/bin/python" "-m" "nodeagent.main" '
        '"--dir" "/s/100%%$$x" "run"'
    )
    assert shlex.split(exec_start.replace("%%", "%").replace("$$", "$")) == argv
    environment = _directive(text, "Environment")
    assert '"PATH=/snap/bin:/usr/bin"' in environment
    assert '"DOCKER_HOST=unix:///d.sock"' in environment
    assert '"XDG_DATA_HOME=/h/data"' in environment
    assert '"VENDETTA_QEMU_STATE_DIR=/q \\"x\\""' in environment
    assert not [e for e in environment if "SECRET" in e]
    assert _directive(text, "StandardOutput") == [f'"append:{tmp_path}/agent.log"']


def test_user_env_finds_the_runtime_dir_a_plain_ssh_exec_lacks() -> None:
    env = agent_unit.user_env({"PATH": "/usr/bin"})
    assert env["XDG_RUNTIME_DIR"].startswith("/run/user/")
    kept = agent_unit.user_env({"XDG_RUNTIME_DIR": "/run/user/7"})
    assert kept["XDG_RUNTIME_DIR"] == "/run/user/7"


async def test_facts_without_systemd_or_forced_detached(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(agent_unit.RUNNER_ENV, "detached")
    assert (await agent_unit.facts()).forced_detached
    monkeypatch.delenv(agent_unit.RUNNER_ENV)
    if not Path("/run/systemd/system").is_dir():  # this machine: no systemd as init
        assert decide(await agent_unit.facts()).why == "systemd is not the node's init"


async def test_upgrade_asks_the_agent_its_build_afresh(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = cluster.coordinator.node_service
    conn = cluster.coordinator.nodes.get("node1")
    assert conn.info is not None
    current = conn.info.version
    # The node's agent was replaced behind the coordinator's back since it connected.
    monkeypatch.setattr(servicer, "build_id", lambda: "0.0.1+other")
    (result,) = await service.upgrade(["node1"])
    assert result.old_version == "0.0.1+other", result
    assert result.old_version != current
    # This fake agent cannot be replaced: the upgrade says so instead of "already current".
    assert result.new_version == "0.0.1+other" and "by hand" in result.error
