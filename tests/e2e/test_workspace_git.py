"""git inside a workspace whose source is a mounted worktree (issue 17), local node.

A worktree's `.git` is a file pointing into the repository's git directory; the
repository is mounted beside the worktree at the same path, so `git status` and
`git commit` work inside, the commit is on branch vendetta/NAME here at once, and
what git writes stays the source owner's. Docker and LXD, with the Debian test image
(it has git; busybox has not).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require
from tests.e2e.test_workspace_source import git_commit, inside, leaves_nothing, sh, source
from tests.support.cli import Env, cli_env

pytestmark = [pytest.mark.e2e]

RUN = uuid.uuid4().hex[:6]
DEBIAN = os.environ.get("VENDETTA_DEBIAN_TEST_IMAGE", "vendetta/debian12")
CONFIG = {
    "docker": f"docker: {{image: '{DEBIAN}:latest'}}\n",
    "lxd": f"provider: lxd\nlxd: {{image: '{DEBIAN}', cpu: 1, memory: 256M}}\n",
}


def _has_image(provider: str) -> bool:
    try:
        if provider == "docker":
            import docker

            client = docker.from_env(timeout=5)
            try:
                client.images.get(f"{DEBIAN}:latest")
            finally:
                client.close()
        else:
            import pylxd

            pylxd.Client().api.images.aliases[DEBIAN].get()
    except Exception:
        return False
    return True


def git_project(root: Path, provider: str) -> Path:
    root.mkdir(parents=True)
    (root / ".vendetta").mkdir()
    (root / ".vendetta" / "config.yaml").write_text(f"name: {root.name}\n{CONFIG[provider]}")
    (root / "hello.txt").write_text("hello\n")
    sh("git", "init", "-q", "-b", "main", cwd=root)
    git_commit(root, "first")
    return root / ".vendetta" / "config.yaml"


@pytest.fixture(scope="module")
def local() -> Iterator[Env]:
    with cli_env(prefix="vd-git-") as e:
        e.cli("server", "start")
        yield e


@pytest.mark.parametrize(
    "provider",
    [
        pytest.param("docker", marks=pytest.mark.docker),
        pytest.param("lxd", marks=pytest.mark.lxd),
    ],
)
def test_git_works_inside_a_mounted_worktree(
    local: Env, provider: str, request: pytest.FixtureRequest
) -> None:
    request.getfixturevalue(f"{provider}_engine")
    require(provider, _has_image(provider), f"no {DEBIAN} image (scripts/build-test-image.sh)")
    e = local
    cfg = git_project(e.home / f"g-{provider}", provider)
    repo = cfg.parent.parent
    ws = f"git-{provider}-{RUN}"
    e.cli("workspace", "create", ws, "--config", str(cfg), timeout=300)
    try:
        e.cli("workspace", "up", ws, timeout=300)
        worktree = Path(source(e, ws)["path"])
        status = inside(e, ws, "cd /workspace && git status --porcelain --branch")
        assert status.startswith(f"## vendetta/{ws}"), status
        inside(
            e,
            ws,
            "cd /workspace && echo inside > made.txt && git add made.txt && "
            "git -c user.name=w -c user.email=w@w commit -qm 'made inside'",
        )
        # The commit is on the workspace's branch here at once, and the worktree is clean.
        assert sh("git", "log", "-1", "--format=%s", f"vendetta/{ws}", cwd=repo) == "made inside\n"
        assert sh("git", "status", "--porcelain", cwd=worktree) == ""
        # What git wrote (the commit's object) belongs to the source's owner here.
        commit = sh("git", "rev-parse", f"vendetta/{ws}", cwd=repo).strip()
        obj = repo / ".git" / "objects" / commit[:2] / commit[2:]
        assert obj.stat().st_uid == worktree.stat().st_uid
        assert (repo / ".git" / "worktrees" / ws / "index").stat().st_uid == worktree.stat().st_uid
        # Committed there: destroy keeps the branch and says so.
        kept = e.cli("workspace", "destroy", ws, timeout=300).stdout
        assert f"vendetta/{ws}" in kept
    finally:
        e.cli("workspace", "destroy", ws, "--force", timeout=300, check=False)
    leaves_nothing(e, ws)
    assert sh("git", "log", "-1", "--format=%s", f"vendetta/{ws}", cwd=repo) == "made inside\n"
