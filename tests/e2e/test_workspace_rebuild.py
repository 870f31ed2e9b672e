"""A changed config takes effect (issue 17): `up` re-reads it (the project's file)
and says what changed, applying services and hooks; a new image waits for `rebuild`,
which makes a new environment keeping /workspace and its branch, services back.
A config that does not parse and a failing setup hook each say what to fix and that
`up` applies it. The busybox test image rebuilt onto Debian's: Docker on the local
node and on a remote one as a user who is not root (the node's copy stays), LXD on
the local node (mounted again with the same id mapping).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from providers.base import LABEL_OWNER
from tests.conftest import LXD_TEST_IMAGE, TEST_IMAGE, require
from tests.e2e.test_workspace_git import DEBIAN, _has_image
from tests.e2e.test_workspace_source import (  # noqa: F401 (remote: a fixture)
    git_commit,
    inside,
    leaves_nothing,
    remote,
    sh,
    source,
)
from tests.support.cli import Env, cli_env, containers

pytestmark = [pytest.mark.e2e]

RUN = uuid.uuid4().hex[:6]
SERVICE = """
  {name}:
    command: "echo {name} up; while :; do sleep 1; done"
"""


def config(image: str, services: list[str], setup: str = "true") -> str:
    body = "".join(SERVICE.format(name=n) for n in services)
    return f"name: rb\ndocker: {{image: '{image}'}}\nhooks: {{setup: '{setup}'}}\nservices:{body}"


@pytest.fixture(scope="module")
def local(docker_engine: None) -> Iterator[Env]:
    with cli_env(prefix="vd-rb-") as e:
        e.cli("server", "start")
        yield e


def said(proc: object) -> str:
    return " ".join((getattr(proc, "stdout", "") + getattr(proc, "stderr", "")).split())


def states(e: Env, ws: str) -> dict[str, str]:
    return {s["name"]: s["state"] for s in e.workspace(ws).get("services", [])}


@pytest.mark.docker
def test_up_rereads_the_config_and_rebuild_makes_a_new_environment(local: Env) -> None:
    require("docker", _has_image("docker"), f"no {DEBIAN} image (scripts/build-test-image.sh)")
    e = local
    repo = e.home / "rb"
    (repo / ".vendetta").mkdir(parents=True)
    (repo / ".vendetta" / "config.yaml").write_text(config(TEST_IMAGE, ["a"]))
    sh("git", "init", "-q", "-b", "main", cwd=repo)
    git_commit(repo, "first")
    ws = f"rb-{RUN}"
    e.cli("workspace", "create", ws, "--config", str(repo / ".vendetta" / "config.yaml"))
    try:
        e.cli("workspace", "up", ws)
        worktree = Path(source(e, ws)["path"])
        inside(e, ws, "echo kept > /workspace/kept.txt")
        cfg = repo / ".vendetta" / "config.yaml"  # the project's, as at create

        # A new service: applied by `up`, which says so.
        cfg.write_text(config(TEST_IMAGE, ["a", "b"]))
        up = said(e.cli("workspace", "up", ws))
        assert "services added: b (applied now)" in up, up
        assert set(states(e, ws)) == {"a", "b"}

        # A config that does not parse: nothing changes, and it says what to fix.
        cfg.write_text("name: rb\ndocker: [\n")
        bad = e.fails("workspace", "up", ws)
        assert str(cfg) in bad and f"workspace up {ws}` again (nothing was changed)" in bad

        # A failing setup hook (changed, so it runs again): what applies a fix.
        cfg.write_text(config(TEST_IMAGE, ["a", "b"], setup="exit 3"))
        hook = e.fails("workspace", "up", ws)
        assert "setup hook" in hook and "exited with code 3" in hook, hook
        assert f"`vendetta workspace up {ws}` applies it" in hook, hook

        # A new image: `up` says it needs a rebuild and keeps the environment.
        cfg.write_text(config(f"{DEBIAN}:latest", ["a", "b"]))
        up = said(e.cli("workspace", "up", ws))
        assert f"docker.image {TEST_IMAGE} -> {DEBIAN}:latest" in up, up
        assert f"vendetta workspace rebuild {ws}" in up
        assert e.workspace(ws)["image"] == TEST_IMAGE
        assert f"`vendetta workspace rebuild {ws}` applies it" in said(
            e.cli("workspace", "status", ws)
        )
        assert "debian" not in inside(e, ws, "cat /etc/os-release 2>/dev/null; echo")

        (before,) = containers(ws)
        rebuilt = said(e.cli("workspace", "rebuild", ws, timeout=300))
        assert f"rebuilt on node local (docker, image {DEBIAN}:latest)" in rebuilt, rebuilt
        after = e.workspace(ws)
        assert after["image"] == f"{DEBIAN}:latest" and after["state"] == "WORKSPACE_STATE_RUNNING"
        assert not after.get("rebuild_pending")
        assert "Debian" in inside(e, ws, "cat /etc/os-release")
        (now,) = containers(ws)  # a new one, labelled as this coordinator's like the old
        assert now.id != before.id and before.labels[LABEL_OWNER]
        assert now.labels[LABEL_OWNER] == before.labels[LABEL_OWNER]
        # /workspace and its branch stay; the services are back.
        assert inside(e, ws, "cat /workspace/kept.txt") == "kept\n"
        assert source(e, ws)["path"] == str(worktree)
        assert source(e, ws)["branch"] == f"vendetta/{ws}"
        assert sh("git", "branch", "--show-current", cwd=worktree).strip() == f"vendetta/{ws}"
        assert states(e, ws) == {"a": "SERVICE_STATE_HEALTHY", "b": "SERVICE_STATE_HEALTHY"}
        # Nothing pending any more: `up` has nothing to say about the config.
        assert "rebuild" not in said(e.cli("workspace", "up", ws))
    finally:
        e.cli("workspace", "destroy", ws, "--force", check=False)
    leaves_nothing(e, ws)


def test_rebuild_of_an_unknown_workspace_names_it(local: Env) -> None:
    assert "unknown workspace 'nope-rb'" in local.fails("workspace", "rebuild", "nope-rb")


@pytest.mark.docker
def test_rebuild_on_a_remote_node_keeps_the_nodes_copy(remote: Env) -> None:  # noqa: F811
    require("docker", _has_image("docker"), f"no {DEBIAN} image (scripts/build-test-image.sh)")
    e = remote
    repo = e.home / "rrb"
    (repo / ".vendetta").mkdir(parents=True)
    (repo / ".vendetta" / "config.yaml").write_text(config(TEST_IMAGE, ["a"]))
    sh("git", "init", "-q", "-b", "main", cwd=repo)
    git_commit(repo, "first")
    ws = f"rrb-{RUN}"
    cfg = repo / ".vendetta" / "config.yaml"
    e.cli("workspace", "create", ws, "--remote", "n1", "--config", str(cfg))
    try:
        e.cli("workspace", "up", ws)
        src = source(e, ws)
        inside(e, ws, "echo made inside > /workspace/inside.txt")
        cfg.write_text(config(f"{DEBIAN}:latest", ["a"]))  # re-read here, not on the node
        rebuilt = said(e.cli("workspace", "rebuild", ws, timeout=300))
        assert f"rebuilt on node n1 (docker, image {DEBIAN}:latest)" in rebuilt, rebuilt
        assert "Debian" in inside(e, ws, "cat /etc/os-release")
        assert inside(e, ws, "cat /workspace/inside.txt") == "made inside\n"
        assert source(e, ws)["node_path"] == src["node_path"]
        assert states(e, ws) == {"a": "SERVICE_STATE_HEALTHY"}
    finally:
        e.cli("workspace", "destroy", ws, "--force", check=False)
    leaves_nothing(e, ws)


@pytest.mark.lxd
def test_rebuild_on_lxd_keeps_the_mounted_source(local: Env, lxd_engine: None) -> None:
    require("lxd", _has_image("lxd"), f"no LXD {DEBIAN} image (scripts/build-test-image.sh)")
    e = local
    folder = e.home / "lrb"
    (folder / ".vendetta").mkdir(parents=True)
    lxd = "provider: lxd\nlxd: {{image: '{}', cpu: 1, memory: 256M}}\n"
    cfg = folder / ".vendetta" / "config.yaml"
    cfg.write_text(f"name: lrb\n{lxd.format(LXD_TEST_IMAGE)}")
    ws = f"lrb-{RUN}"
    e.cli("workspace", "create", ws, "--config", str(cfg), timeout=300)
    try:
        e.cli("workspace", "up", ws, timeout=300)
        inside(e, ws, "echo made inside > /workspace/inside.txt")
        cfg.write_text(f"name: lrb\n{lxd.format(DEBIAN)}")
        assert f"lxd.image {LXD_TEST_IMAGE} -> {DEBIAN}" in said(e.cli("workspace", "up", ws))
        e.cli("workspace", "rebuild", ws, timeout=300)
        assert "Debian" in inside(e, ws, "cat /etc/os-release")
        # Mounted again with the same id mapping: readable and writable inside.
        assert inside(e, ws, "cat /workspace/inside.txt; echo again >> /workspace/inside.txt")
        assert (folder / "inside.txt").read_text() == "made inside\nagain\n"
        assert (folder / "inside.txt").stat().st_uid == folder.stat().st_uid
    finally:
        e.cli("workspace", "destroy", ws, "--force", timeout=300, check=False)
    leaves_nothing(e, ws)
