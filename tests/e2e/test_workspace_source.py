"""Your code in the workspace (issue 17), through the CLI.

Local node (Docker): a git project's workspace gets a worktree of its own on branch
vendetta/NAME, mounted at /workspace: a file made before `create` (uncommitted, with
--with-changes) is there, a file written inside appears in the worktree at once; two
workspaces get two branches and worktrees; destroy refuses while the worktree holds
uncommitted work and --force drops it. Bad sources are refused with nothing left.

Remote node as a user who is not root, behind its own sshd: the source is shipped
(ignored files stay home), a commit made in the node's copy comes back with `pull`
(destroy refuses until then), local changes reach the workspace with `push`, a plain
folder's pull refuses to overwrite local changes without --force and deletes here what
was deleted there, and a source over the configured limit is refused naming what is
large.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import LXD_TEST_IMAGE, TEST_IMAGE, require
from tests.support.cli import Env, cli_env, containers, wait_for
from tests.support.node_user import (
    MEMBER,
    agent_python,
    open_dir,
    remove_as_root,
    users_problem,
)
from tests.support.sshd import SshServer

pytestmark = [pytest.mark.e2e, pytest.mark.docker]

RUN = uuid.uuid4().hex[:6]


def sh(*args: str, cwd: Path, user: str = "") -> str:
    argv = ["runuser", "-u", user, "--", *args] if user else list(args)
    return subprocess.run(argv, cwd=cwd, check=True, capture_output=True, text=True).stdout


def git_commit(repo: Path, message: str, *paths: str, user: str = "") -> None:
    sh("git", "add", *(paths or ("-A",)), cwd=repo, user=user)
    sh("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", message, cwd=repo,
       user=user)  # fmt: skip


def project(root: Path, name: str, extra: str = "", git: bool = True) -> Path:
    """A project folder with .vendetta/config.yaml; a git repository with one commit."""
    root.mkdir(parents=True)
    (root / ".vendetta").mkdir()
    (root / ".vendetta" / "config.yaml").write_text(
        f"name: {name}\ndocker: {{image: '{TEST_IMAGE}'}}\n{extra}"
    )
    (root / ".gitignore").write_text("*.log\n")
    (root / "hello.txt").write_text("hello from before create\n")
    if git:
        sh("git", "init", "-q", "-b", "main", cwd=root)
        git_commit(root, "first")
    return root / ".vendetta" / "config.yaml"


def inside(e: Env, ws: str, script: str) -> str:
    return e.cli("workspace", "exec", ws, "--", "sh", "-c", script).stdout


def source(e: Env, ws: str) -> dict[str, Any]:
    return dict(e.workspace(ws)["source"])


def leaves_nothing(e: Env, ws: str) -> None:
    assert ws not in {w["name"] for w in e.json("workspace", "list")}
    assert not containers(ws)
    worktrees = Path(e.env["VENDETTA_HOME"]) / "worktrees"
    assert not any(p.name == ws for p in worktrees.glob("*/*")), list(worktrees.glob("*/*"))


@pytest.fixture(scope="module")
def local(docker_engine: None) -> Iterator[Env]:
    with cli_env(prefix="vd-src-") as e:
        e.cli("server", "start")
        yield e


def test_local_git_source_is_a_live_worktree_at_workspace(local: Env) -> None:
    e = local
    cfg = project(e.home / "proj", "proj")
    repo = cfg.parent.parent
    (repo / "wip.txt").write_text("uncommitted\n")
    (repo / "debug.log").write_text("ignored\n")
    ws, other = f"src-{RUN}", f"src2-{RUN}"
    e.cli("workspace", "create", ws, "--config", str(cfg), "--with-changes")
    src = source(e, ws)
    assert (src["kind"], src["branch"], src["transport"]) == ("git", f"vendetta/{ws}", "live")
    worktree = Path(src["path"])
    assert worktree != repo and (worktree / "wip.txt").exists()
    status = e.cli("workspace", "status", ws).stdout
    assert f"branch vendetta/{ws}" in status and "/workspace" in status
    e.cli("workspace", "up", ws)
    assert inside(e, ws, "cat /workspace/hello.txt; cat /workspace/wip.txt") == (
        "hello from before create\nuncommitted\n"
    )
    assert source(e, ws)["mode"] == "mounted"
    # Written inside: here at once (the worktree is mounted).
    inside(e, ws, "echo made inside > /workspace/inside.txt")
    assert (worktree / "inside.txt").read_text() == "made inside\n"

    # A second workspace of the repository: its own branch and worktree, without the changes.
    e.cli("workspace", "create", other, "--config", str(cfg))
    src2 = source(e, other)
    assert src2["branch"] == f"vendetta/{other}" and src2["path"] != src["path"]
    assert not (Path(src2["path"]) / "wip.txt").exists()
    assert sh("git", "branch", "--show-current", cwd=repo).strip() == "main"

    # Mounted: nothing to push or pull.
    assert "needs no push" in e.fails("workspace", "push", ws)

    # Uncommitted work in the worktree: destroy refuses, --force drops it.
    refused = e.fails("workspace", "destroy", ws)
    assert "uncommitted change" in refused and "--force" in refused
    assert containers(ws)
    e.cli("workspace", "destroy", ws, "--force")
    e.cli("workspace", "destroy", other)
    leaves_nothing(e, ws)
    leaves_nothing(e, other)
    assert not worktree.exists()
    branches = sh("git", "branch", "--format=%(refname:short)", cwd=repo).split()
    assert branches == ["main"]  # no commits of their own: the branches went too


def test_bad_sources_are_refused_with_nothing_left(local: Env) -> None:
    e = local
    cfg = project(e.home / "bad", "bad")
    plain = e.home / "plain"
    plain.mkdir()
    ws = f"bad-{RUN}"
    cases = [
        (["--source", str(e.home / "missing")], "no such folder"),
        (["--source", "https://127.0.0.1:9/nowhere.git"], "cannot clone https://127.0.0.1:9"),
        (["--source", str(plain), "--with-changes"], "--with-changes needs a git repository"),
        (["--branch", "a..b"], "not a valid git branch name"),
    ]
    for args, message in cases:
        out = e.fails("workspace", "create", ws, "--config", str(cfg), *args)
        assert message in out, out
        leaves_nothing(e, ws)
    e.cli("workspace", "create", ws, "--config", str(cfg), "--no-source")
    assert source(e, ws).get("kind", "") == ""
    assert "has no source to pull" in e.fails("workspace", "pull", ws)
    e.cli("workspace", "destroy", ws)
    leaves_nothing(e, ws)
    clones = Path(e.env["VENDETTA_HOME"]) / "worktrees" / "clones"
    assert not clones.exists() or not list(clones.iterdir())


# Remote: a node whose SSH user is not root.


@pytest.fixture(scope="module")
def remote(docker_engine: None) -> Iterator[Env]:
    problem = users_problem()
    require("the test users", not problem, problem)
    scratch = open_dir("vd-src-remote-")
    made: list[Path] = []
    try:
        with cli_env(prefix="vd-srcr-") as e:
            e.cli("server", "start")
            node_home = scratch / "home"
            node_home.mkdir(mode=0o755)
            sh("chown", f"{MEMBER}:{MEMBER}", str(node_home), cwd=scratch)
            server = SshServer.start(
                open_dir("vd-sshd-src-"), host="127.0.0.13", session_env={"HOME": str(node_home)}
            )
            made.append(server.root)
            server.user = MEMBER
            server.authorized_keys_path.chmod(0o644)
            e.nodes["n1"] = server
            agent_dir = node_home / "agent"
            e.agent_dirs.append(agent_dir)
            python = agent_python(MEMBER, scratch)
            e.cli(
                "node", "add", "n1", server.host, "--port", str(server.port), "--user", MEMBER,
                "--identity", str(server.client_key_path), "--yes",
                "--agent-command", f"{python} -m nodeagent.main --dir {agent_dir}",
            )  # fmt: skip
            e.wait_node("n1", "ready")
            yield e
    finally:
        remove_as_root(scratch, *made)


def test_remote_git_source_is_shipped_pulled_and_pushed(remote: Env) -> None:
    e = remote
    cfg = project(e.home / "rproj", "rproj")
    repo = cfg.parent.parent
    (repo / "debug.log").write_text("stays home\n")
    ws = f"rsrc-{RUN}"
    created = e.cli("workspace", "create", ws, "--remote", "n1", "--config", str(cfg))
    assert "shipped to node n1" in created.stdout
    src = source(e, ws)
    assert (src["kind"], src["transport"], src["branch"]) == ("git", "shipped", f"vendetta/{ws}")
    node_copy = Path(src["node_path"])
    assert node_copy.owner() == MEMBER and (node_copy / "hello.txt").owner() == MEMBER
    assert not (node_copy / "debug.log").exists()
    e.cli("workspace", "up", ws)
    assert inside(e, ws, "cat /workspace/hello.txt") == "hello from before create\n"
    assert inside(e, ws, "test -e /workspace/debug.log && echo sent || echo home") == "home\n"
    # The node's copy is a repository of its own on the workspace's branch.
    branch = sh("git", "branch", "--show-current", cwd=node_copy, user=MEMBER)
    assert branch.strip() == f"vendetta/{ws}"

    # A commit made in the workspace: destroy refuses until it is pulled.
    inside(e, ws, "echo from the workspace > /workspace/feature.txt")
    git_commit(node_copy, "made in the workspace", "feature.txt", user=MEMBER)
    refused = e.fails("workspace", "destroy", ws)
    assert f"vendetta/{ws}" in refused and "pull" in refused and "--force" in refused
    pulled = e.cli("workspace", "pull", ws).stdout
    assert f"pulled 1 commit(s) onto branch vendetta/{ws}" in pulled
    log = sh("git", "log", "--format=%s", f"vendetta/{ws}", cwd=repo)
    assert log.splitlines()[0] == "made in the workspace"

    # A local change reaches the workspace with push: changed, added, deleted.
    worktree = Path(src["path"])
    (worktree / "hello.txt").write_text("changed here\n")
    (worktree / "added.txt").write_text("added here\n")
    (worktree / "feature.txt").unlink()
    pushed = e.json("workspace", "push", ws)
    assert pushed["done"] and sorted(pushed["paths"]) == ["added.txt", "feature.txt", "hello.txt"]
    assert inside(e, ws, "cat /workspace/hello.txt /workspace/added.txt") == (
        "changed here\nadded here\n"
    )
    assert inside(e, ws, "test -e /workspace/feature.txt && echo there || echo gone") == "gone\n"
    assert "nothing to push" in e.cli("workspace", "push", ws).stdout

    # Uncommitted work in the workspace: destroy refuses while it is only there.
    inside(e, ws, "echo wip > /workspace/wip-inside.txt")
    refused = e.fails("workspace", "destroy", ws)
    assert "nowhere else (wip-inside.txt): commit them there" in refused, refused
    inside(e, ws, "rm /workspace/wip-inside.txt")

    (worktree / "hello.txt").write_text("hello from before create\n")
    (worktree / "feature.txt").write_text("from the workspace\n")
    (worktree / "added.txt").unlink()
    done = e.cli("workspace", "destroy", ws).stdout
    assert "destroyed" in done and f"branch vendetta/{ws}" in done  # kept: a commit of its own
    wait_for("the node's copy removed", lambda: not node_copy.exists())
    leaves_nothing(e, ws)


def test_remote_folder_pull_refuses_to_overwrite_local_changes(remote: Env) -> None:
    e = remote
    cfg = project(e.home / "fproj", "fproj", git=False)
    folder = cfg.parent.parent
    ws = f"fsrc-{RUN}"
    e.cli("workspace", "create", ws, "--remote", "n1", "--config", str(cfg))
    node_copy = Path(source(e, ws)["node_path"])
    e.cli("workspace", "up", ws)
    inside(e, ws, "echo theirs > /workspace/hello.txt; echo new > /workspace/new.txt")
    (folder / "hello.txt").write_text("mine\n")
    refused = e.fails("workspace", "pull", ws)
    assert "changed both here and in the workspace: hello.txt" in refused and "--force" in refused
    assert (folder / "hello.txt").read_text() == "mine\n" and not (folder / "new.txt").exists()
    e.cli("workspace", "pull", ws, "--force")
    assert (folder / "hello.txt").read_text() == "theirs\n"
    assert (folder / "new.txt").read_text() == "new\n"
    # A file made in the workspace and not pulled: destroy refuses until it is.
    inside(e, ws, "echo late > /workspace/late.txt")
    refused = e.fails("workspace", "destroy", ws)
    assert "1 changed file(s) that are nowhere else (late.txt)" in refused, refused
    e.cli("workspace", "pull", ws)
    # Deleted in the workspace: deleted here at the next pull, unless changed here since.
    inside(e, ws, "rm /workspace/new.txt /workspace/hello.txt")
    (folder / "hello.txt").write_text("mine again\n")
    refused = e.fails("workspace", "pull", ws)
    assert "changed both here and in the workspace: hello.txt" in refused, refused
    assert (folder / "new.txt").exists()  # nothing was written
    (folder / "hello.txt").write_text("theirs\n")  # as last received: unchanged here
    pulled = e.json("workspace", "pull", ws)
    assert sorted(pulled["paths"]) == ["hello.txt", "new.txt"], pulled
    assert "2 deleted" in pulled["summary"]
    assert not (folder / "hello.txt").exists() and not (folder / "new.txt").exists()
    assert "nothing to pull" in e.cli("workspace", "pull", ws).stdout
    e.cli("workspace", "destroy", ws)
    wait_for("the node's copy removed", lambda: not node_copy.exists())
    assert folder.exists()  # a plain folder is the user's: never removed
    leaves_nothing(e, ws)


def test_a_source_over_the_limit_is_refused_naming_what_is_large(remote: Env) -> None:
    e = remote
    cfg = project(e.home / "big", "big", extra="source: {max_size: 1M}\n")
    folder = cfg.parent.parent
    (folder / "assets").mkdir()
    (folder / "assets" / "video.bin").write_bytes(b"\0" * (2 * 1024 * 1024))
    git_commit(folder, "assets")
    ws = f"big-{RUN}"
    out = e.fails("workspace", "create", ws, "--remote", "n1", "--config", str(cfg))
    assert "over the limit" in out and "assets/ (2.0 MiB, 1 files)" in out
    assert ".vendettaignore" in out
    leaves_nothing(e, ws)
    assert sh("git", "branch", "--format=%(refname:short)", cwd=folder).split() == ["main"]


# The other providers on the local node: the source is at /workspace there too.

OTHER = {
    "lxd": f"provider: lxd\nlxd: {{image: '{LXD_TEST_IMAGE}', cpu: 1, memory: 256M}}\n",
    "qemu": "provider: qemu\nqemu: {image: debian-12, cpu: 1, memory: 512M, disk: 2G}\n",
}


@pytest.mark.parametrize(
    "provider",
    [pytest.param("lxd", marks=pytest.mark.lxd), pytest.param("qemu", marks=pytest.mark.qemu)],
)
def test_the_source_is_at_workspace_on_lxd_and_qemu(local: Env, provider: str) -> None:
    e = local
    cfg = project(e.home / f"p-{provider}", f"p-{provider}", extra=OTHER[provider])
    repo = cfg.parent.parent
    (repo / "wip.txt").write_text("uncommitted\n")
    ws = f"{provider}-{RUN}"
    e.cli("workspace", "create", ws, "--config", str(cfg), "--with-changes", timeout=300)
    try:
        e.cli("workspace", "up", ws, timeout=300)
        got = inside(e, ws, "cat /workspace/hello.txt /workspace/wip.txt")
        assert got == "hello from before create\nuncommitted\n"
        src = source(e, ws)
        assert src["mode"] in ("mounted", "copied")
        if src["mode"] == "mounted":  # written inside: here at once
            assert src["transport"] == "live"
            inside(e, ws, "echo made inside > /workspace/inside.txt")
            assert (Path(src["path"]) / "inside.txt").read_text() == "made inside\n"
        else:  # copied at the first start: push and pull say they cannot reach it
            assert "copied the source in at its first start" in e.fails("workspace", "pull", ws)
            # Shipped to the local agent first: a .git of its own, not a worktree's
            # pointer to a repository the guest lacks.
            assert src["transport"] == "shipped"
            assert inside(e, ws, "test -d /workspace/.git && echo own") == "own\n"
            # A rebuild would copy it in again, losing what changed inside: --force.
            refused = e.fails("workspace", "rebuild", ws)
            assert "what changed inside is lost" in refused and "--force" in refused
            assert source(e, ws)["mode"] == "copied"  # nothing was done
    finally:
        e.cli("workspace", "destroy", ws, "--force", timeout=300)
    leaves_nothing(e, ws)
