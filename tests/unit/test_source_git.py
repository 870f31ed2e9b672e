"""A workspace's source on this machine: kinds, worktrees, clones, changes carried,
what destroy would lose. Real git in temporary folders."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from common.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from coordinator import source_git
from coordinator.source_git import git, resolve


def sh(*args: str, cwd: Path) -> str:
    return subprocess.run(args, cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def commit(repo: Path, message: str = "c") -> None:
    sh("git", "add", "-A", cwd=repo)
    sh("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", message, cwd=repo)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "proj"
    r.mkdir()
    sh("git", "init", "-q", "-b", "main", cwd=r)
    (r / ".gitignore").write_text("*.log\n")
    (r / "app.py").write_text("print('v1')\n")
    commit(r, "first")
    return r


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


async def test_a_plain_folder_is_taken_as_it_is(tmp_path: Path, home: Path) -> None:
    folder = tmp_path / "plain"
    folder.mkdir()
    src = await resolve(home, "ws", str(folder), "", False)
    assert (src.kind, src.path, src.branch) == ("folder", str(folder), "")
    assert not (home / "worktrees").exists()


async def test_no_source_is_none(home: Path) -> None:
    assert (await resolve(home, "ws", "", "", False)).kind == ""


async def test_each_workspace_gets_its_own_worktree_and_branch(repo: Path, home: Path) -> None:
    a = await resolve(home, "api", str(repo), "", False)
    b = await resolve(home, "web", str(repo), "", False)
    assert (a.kind, a.branch, b.branch) == ("git", "vendetta/api", "vendetta/web")
    assert a.path != b.path
    for src in (a, b):
        wt = Path(src.path)
        assert (wt / "app.py").read_text() == "print('v1')\n"
        assert sh("git", "branch", "--show-current", cwd=wt) == src.branch
        assert src.repo == str(repo)
        assert src.base_commit == sh("git", "rev-parse", "HEAD", cwd=repo)
    # The user's checkout is untouched.
    assert sh("git", "branch", "--show-current", cwd=repo) == "main"


async def test_branch_option_and_a_branch_already_checked_out(repo: Path, home: Path) -> None:
    src = await resolve(home, "api", str(repo), "feature/x", False)
    assert sh("git", "branch", "--show-current", cwd=Path(src.path)) == "feature/x"
    with pytest.raises(FailedPreconditionError, match="cannot make a worktree"):
        await resolve(home, "other", str(repo), "main", False)
    assert not (Path(src.path).parent / "other").exists()
    with pytest.raises(InvalidArgumentError, match="not a valid git branch name"):
        await resolve(home, "bad", str(repo), "a..b", False)


async def test_with_changes_carries_uncommitted_work_but_not_ignored_files(
    repo: Path, home: Path
) -> None:
    (repo / "app.py").write_text("print('v2')\n")  # modified, unstaged
    (repo / "staged.py").write_text("s\n")
    sh("git", "add", "staged.py", cwd=repo)
    (repo / "new").mkdir()
    (repo / "new" / "untracked.py").write_text("u\n")
    (repo / "debug.log").write_text("secret\n")  # ignored
    src = await resolve(home, "ws", str(repo), "", True)
    wt = Path(src.path)
    assert (wt / "app.py").read_text() == "print('v2')\n"
    assert (wt / "staged.py").read_text() == "s\n"
    assert (wt / "new" / "untracked.py").read_text() == "u\n"
    assert not (wt / "debug.log").exists()
    # Still uncommitted there: the branch starts at HEAD.
    assert sh("git", "rev-parse", "HEAD", cwd=wt) == sh("git", "rev-parse", "HEAD", cwd=repo)
    without = await resolve(home, "plain", str(repo), "", False)
    assert (Path(without.path) / "app.py").read_text() == "print('v1')\n"


async def test_bad_sources_say_what_to_do_and_leave_nothing(
    tmp_path: Path, repo: Path, home: Path
) -> None:
    with pytest.raises(NotFoundError, match="no such folder"):
        await resolve(home, "ws", str(tmp_path / "missing"), "", False)
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(InvalidArgumentError, match="--with-changes needs a git repository"):
        await resolve(home, "ws", str(plain), "", True)
    with pytest.raises(InvalidArgumentError, match="need a source"):
        await resolve(home, "ws", "", "", True)
    with pytest.raises(FailedPreconditionError, match=r"cannot clone file:///nowhere/x\.git"):
        await resolve(home, "ws", "file:///nowhere/x.git", "", False)
    assert list((home / "worktrees" / "clones").iterdir()) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    sh("git", "init", "-q", cwd=empty)
    with pytest.raises(FailedPreconditionError, match="no commit yet"):
        await resolve(home, "ws", str(empty), "", False)


async def test_a_git_url_is_cloned_on_the_workspace_branch(repo: Path, home: Path) -> None:
    src = await resolve(home, "ws", f"file://{repo}", "", False)
    clone = Path(src.path)
    assert (src.kind, src.repo, src.origin) == ("git", "", f"file://{repo}")
    assert sh("git", "branch", "--show-current", cwd=clone) == "vendetta/ws"
    assert (clone / "app.py").exists()
    assert await source_git.unkept(src) == ""
    (clone / "app.py").write_text("changed\n")
    commit(clone)
    assert "not pushed there" in await source_git.unkept(src)
    await source_git.remove(src)
    assert not clone.exists()


async def test_remove_keeps_a_branch_with_commits_of_its_own(repo: Path, home: Path) -> None:
    idle = await resolve(home, "idle", str(repo), "", False)
    busy = await resolve(home, "busy", str(repo), "", False)
    wt = Path(busy.path)
    (wt / "feature.py").write_text("f\n")
    assert "1 uncommitted change" in await source_git.unkept(busy)
    commit(wt, "feature")
    assert await source_git.unkept(busy) == ""
    assert await source_git.remove(idle) == ""
    kept = await source_git.remove(busy)
    assert "branch vendetta/busy" in kept and "1 commit" in kept
    assert not Path(idle.path).exists() and not wt.exists()
    branches = sh("git", "branch", "--format=%(refname:short)", cwd=repo).split()
    assert "vendetta/busy" in branches and "vendetta/idle" not in branches
    assert "busy" not in await git("worktree", "list", cwd=repo)
    # A workspace made again under that name picks its branch up where it was.
    again = await resolve(home, "busy", str(repo), "", False)
    assert (Path(again.path) / "feature.py").exists()
