"""Orphans (issue 15, defect 6): environments on a node that no workspace here owns.

A node behind a real sshd (through a pausable proxy, so it can go silent), real Docker:

- `workspace destroy --force` while the node is disconnected forgets the workspace
  but its container keeps running there; once the node is back, `node status` lists
  it (made here), `workspace adopt` brings it back as a workspace `exec` works in,
  and after a second forced destroy `node clean` removes the container.
- `node remove --force` forgets the node's workspaces; added again, the node lists
  them and `node clean` removes them.
- A second coordinator sharing the node's user (so its agent) meets the first one's
  environment: its create advises `adopt`/`node clean` (which it can do), not
  `up`/`destroy`; its `node status` names it another coordinator's and `node clean`
  keeps it unless named.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import TEST_IMAGE
from tests.support.cli import Env, cli_env, containers, wait_for
from tests.support.fault_proxy import PausableProxy
from tests.support.member_node import MemberNodes, member_env

pytestmark = [pytest.mark.e2e, pytest.mark.docker, pytest.mark.sshd]

GRACE = 3


def config(e: Env, name: str) -> Path:
    path = e.home / name / ".vendetta" / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"name: {name}\nprovider: docker\ndocker:\n  image: '{TEST_IMAGE}'\n"
        "  command: [/bin/sh, -c, 'while :; do sleep 1; done']\n"
    )
    return path


PROXY: dict[str, PausableProxy] = {}


@pytest.fixture(scope="module")
def env() -> Iterator[tuple[Env, MemberNodes]]:
    """oa: a node reached as MEMBER (not root) through a pausable proxy in front of its sshd."""
    with member_env("vd-orph-") as (e, m):
        server = m.sshd("oa", "127.0.0.41")
        PROXY["oa"] = proxy = PausableProxy.start("127.0.0.42", server.host, server.port)
        try:
            e.cli("server", "start")
            m.add("oa", server, "--grace", str(GRACE), via=proxy)
            yield e, m
        finally:
            proxy.stop()


def orphans(e: Env, node: str) -> dict[str, dict[str, object]]:
    status = json.loads(e.cli("node", "status", node, "--json").stdout)
    return {o["workspace"]: o for o in status.get("orphans", [])}


def running(name: str) -> bool:
    return any(c.status == "running" for c in containers(name))


def test_forced_destroy_while_away_then_status_adopt_and_clean(
    env: tuple[Env, MemberNodes],
) -> None:
    e, _ = env
    e.cli("workspace", "create", "orw1", "--remote", "oa", "--config", str(config(e, "orw1")))
    e.cli("workspace", "up", "orw1")
    assert orphans(e, "oa") == {}  # owned by a workspace: not an orphan
    PROXY["oa"].pause()
    try:
        e.wait_node("oa", "disconnected", within=GRACE + 30)
        said = e.fails("workspace", "destroy", "orw1")
        assert "--force" in said, said
        e.cli("workspace", "destroy", "orw1", "--force")
    finally:
        PROXY["oa"].resume()
    e.wait_node("oa", "ready", within=60)
    assert running("orw1"), "the container should have been left running on the node"
    found = orphans(e, "oa")
    assert set(found) == {"orw1"}, found
    assert found["orw1"]["mine"] is True and found["orw1"]["provider"] == "docker", found
    text = e.cli("node", "status", "oa").stdout
    assert "orw1" in text and "workspace adopt" in text and "node clean" in text, text

    # adopt: a workspace again, exec works in it, no longer an orphan
    e.cli("workspace", "adopt", "orw1", "--node", "oa")
    ws = e.workspace("orw1")
    assert ws["node"] == "oa" and ws["state"] == "WORKSPACE_STATE_RUNNING", ws
    out = e.cli("workspace", "exec", "orw1", "--", "echo", "adopted-ok").stdout
    assert "adopted-ok" in out
    assert orphans(e, "oa") == {}
    said = e.fails("workspace", "adopt", "orw1", "--node", "oa")
    assert "already exists" in said, said

    # forced away again, then cleaned: asked first (no terminal: --yes), container gone
    PROXY["oa"].pause()
    try:
        e.wait_node("oa", "disconnected", within=GRACE + 30)
        e.cli("workspace", "destroy", "orw1", "--force")
    finally:
        PROXY["oa"].resume()
    e.wait_node("oa", "ready", within=60)
    said = e.fails("node", "clean", "oa")
    assert "--yes" in said and "orw1" in said, said
    assert running("orw1")
    cleaned = json.loads(e.cli("node", "clean", "oa", "--yes", "--json").stdout)
    assert [o["workspace"] for o in cleaned["removed"]] == ["orw1"], cleaned
    wait_for("the container to go", lambda: not containers("orw1"), 30)
    assert orphans(e, "oa") == {}
    assert "no orphans" in e.cli("node", "clean", "oa", "--yes").stdout


def test_node_remove_force_then_clean(env: tuple[Env, MemberNodes]) -> None:
    e, m = env
    server = e.nodes.get("ob") or m.sshd("ob", "127.0.0.43")
    PROXY["ob"] = proxy = PausableProxy.start("127.0.0.44", server.host, server.port)
    try:
        m.add("ob", server, "--grace", str(GRACE), via=proxy)
        e.cli("workspace", "create", "orw2", "--remote", "ob", "--config", str(config(e, "orw2")))
        e.cli("workspace", "up", "orw2")
        e.cli("node", "remove", "ob", "--force")
        assert running("orw2")
        m.add("ob", server, "--grace", str(GRACE), via=proxy)  # the same agent again
        e.wait_node("ob", "ready", within=60)
        assert set(orphans(e, "ob")) == {"orw2"}
        e.cli("node", "clean", "ob", "orw2", "--yes")
        wait_for("the container to go", lambda: not containers("orw2"), 30)
    finally:
        e.cli("node", "remove", "ob", "--force", check=False)
        proxy.stop()


def test_second_coordinator_gets_advice_it_can_follow(env: tuple[Env, MemberNodes]) -> None:
    e, m = env
    cfg = config(e, "orw3")
    (cfg.parent.parent / "marker.txt").write_text("first coordinator's\n")
    e.cli("workspace", "create", "orw3", "--remote", "oa", "--config", str(cfg))  # its folder
    server, proxy = e.nodes["oa"], PROXY["oa"]
    with cli_env(prefix="vd-orph2-") as other:
        other.cli("server", "start")
        # The first coordinator's agent of oa (left out of other's: other must not stop it).
        shared = m.agent_command("oa")
        m.add("oa", server, "--grace", str(GRACE), via=proxy, agent=shared, into=other)
        other.wait_node("oa", "ready", within=60)
        # With a source of its own: the agent keeps one source folder per workspace
        # name, which must not be overwritten or discarded by this refused create.
        cfg2 = config(other, "orw3")
        (cfg2.parent.parent / "marker.txt").write_text("second coordinator's\n")
        said = other.fails("workspace", "create", "orw3", "--remote", "oa", "--config", str(cfg2))
        assert "workspace adopt orw3 --node oa" in said and "node clean oa orw3" in said, said
        assert "workspace up orw3" not in said and "workspace destroy orw3" not in said, said
        found = orphans(other, "oa")
        assert found["orw3"]["mine"] is False and found["orw3"]["owner"], found
        assert "another coordinator" in other.cli("node", "status", "oa").stdout
        kept = json.loads(other.cli("node", "clean", "oa", "--yes", "--json").stdout)
        assert "orw3" in [o["workspace"] for o in kept.get("kept", [])], kept
        assert containers("orw3"), "another coordinator's environment must stay"
    # the first coordinator still has it, and its source
    e.cli("workspace", "up", "orw3")
    out = e.cli("workspace", "exec", "orw3", "--", "cat", "/workspace/marker.txt").stdout
    assert out.strip() == "first coordinator's", out
    e.cli("workspace", "destroy", "orw3", "--force")
