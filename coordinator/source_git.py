"""A workspace's source on this machine: which kind it is, its own git worktree or clone,
and what would be lost in removing it.

The coordinator runs on the user's machine as the user (DESIGN: one per laptop), so it
reads the project folder itself: the worktree's life (create, ship, pull, destroy) stays
with the workspace record that owns it, whichever client asked.

Layout under the coordinator's home:
    worktrees/<repo>-<hash>/<NAME>   a git worktree of the repository, on the workspace's branch
    worktrees/clones/<NAME>          a clone of a git URL
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
from pathlib import Path

from common.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from coordinator.models import WorkspaceSource

# What a git URL looks like: scheme://..., or scp-like user@host:path.
_URL_RE = re.compile(r"^([a-z][a-z0-9+.-]*://|[\w.-]+@[\w.-]+:)", re.IGNORECASE)
# A clone must not wait for a password nobody types (the coordinator has no terminal).
_GIT_ENV = {
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_SSH_COMMAND": "ssh -o BatchMode=yes -o ConnectTimeout=15",
    "LC_ALL": "C",
}
CLONE_TIMEOUT = 900.0


class GitError(FailedPreconditionError):
    """A git command failed; the message has git's own last words."""


def is_url(source: str) -> bool:
    return bool(_URL_RE.match(source))


async def git(
    *args: str, cwd: Path | None = None, timeout: float = 300.0, check: bool = True
) -> str:
    """Run git; its stdout. Fails with git's stderr (last lines) when it does."""
    env = {**os.environ, **_GIT_ENV}
    try:
        proc = await asyncio.create_subprocess_exec(
            "git",
            *args,
            cwd=cwd,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError as exc:
        raise FailedPreconditionError(
            "git is not installed on this machine: install it, or give a plain folder"
        ) from exc
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except (TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if check and proc.returncode != 0:
        last = " ".join(err.decode(errors="replace").strip().splitlines()[-3:])
        verb = next((a for a in args if not a.startswith("-") and "=" not in a), "")
        raise GitError(f"git {verb} failed: {last or f'exit code {proc.returncode}'}")
    return out.decode(errors="replace")


async def toplevel(folder: Path) -> Path | None:
    """The git repository's top folder holding ``folder``; None if it is in none."""
    out = await git("rev-parse", "--show-toplevel", cwd=folder, check=False)
    return Path(out.strip()) if out.strip() else None


def worktrees_dir(home: Path) -> Path:
    return home / "worktrees"


def _repo_dir(home: Path, top: Path) -> Path:
    digest = hashlib.sha256(str(top).encode()).hexdigest()[:8]
    return worktrees_dir(home) / f"{top.name}-{digest}"


async def resolve(
    home: Path, name: str, source: str, branch: str, with_changes: bool
) -> WorkspaceSource:
    """Make the workspace's copy of ``source`` on this machine (a worktree or a clone;
    a plain folder is used as it is). Leaves nothing behind when it fails."""
    if not source:
        if with_changes or branch:
            raise InvalidArgumentError(
                "--with-changes and --branch need a source: run in a project folder "
                "(with .vendetta/config.yaml) or give --source DIR|GIT_URL"
            )
        return WorkspaceSource()
    branch = branch or f"vendetta/{name}"
    valid = (
        ""
        if branch.startswith("-")
        else await git("check-ref-format", "--branch", branch, check=False)
    )
    if not valid.strip():
        raise InvalidArgumentError(f"--branch {branch!r} is not a valid git branch name")
    if is_url(source):
        if with_changes:
            raise InvalidArgumentError(
                f"--with-changes carries a local checkout's changes; {source} is a URL"
            )
        return await _clone(home, name, source, branch)
    folder = Path(source).expanduser()
    if not folder.is_absolute():
        raise InvalidArgumentError(f"--source {source}: give an absolute path")
    if not folder.is_dir():
        raise NotFoundError(
            f"--source {source}: no such folder (give an existing folder or a git URL)"
        )
    top = await toplevel(folder)
    if top is None:
        if with_changes:
            raise InvalidArgumentError(
                f"--with-changes needs a git repository, and {folder} is not in one: "
                "leave it out (the folder is taken as it is)"
            )
        return WorkspaceSource(kind="folder", origin=str(folder), path=str(folder))
    return await _worktree(home, name, folder, top, branch, with_changes)


async def _clone(home: Path, name: str, url: str, branch: str) -> WorkspaceSource:
    dest = worktrees_dir(home) / "clones" / name
    # A leftover of a create that died half way goes first (off the loop: it may be big).
    await asyncio.to_thread(shutil.rmtree, dest, True)
    await asyncio.to_thread(dest.parent.mkdir, parents=True, exist_ok=True)
    try:
        await git("clone", "--quiet", "--", url, str(dest), timeout=CLONE_TIMEOUT)
        await git("checkout", "--quiet", "-B", branch, cwd=dest)
        base = (await git("rev-parse", "HEAD", cwd=dest)).strip()
    except BaseException as exc:
        await asyncio.to_thread(shutil.rmtree, dest, True)
        if isinstance(exc, GitError):
            raise FailedPreconditionError(
                f"cannot clone {url}: {exc}. Check the URL and that this machine can reach "
                "it (and has the access it needs)"
            ) from exc
        raise
    return WorkspaceSource(kind="git", origin=url, branch=branch, path=str(dest), base_commit=base)


async def _worktree(
    home: Path, name: str, folder: Path, top: Path, branch: str, with_changes: bool
) -> WorkspaceSource:
    head = (await git("rev-parse", "--verify", "-q", "HEAD", cwd=top, check=False)).strip()
    if not head:
        raise FailedPreconditionError(
            f"the git repository {top} has no commit yet: commit once, so that the "
            "workspace's branch has somewhere to start"
        )
    dest = _repo_dir(home, top) / name
    if dest.exists():
        await git("worktree", "remove", "--force", str(dest), cwd=top, check=False)
        await asyncio.to_thread(shutil.rmtree, dest, True)
    await git("worktree", "prune", cwd=top, check=False)
    dest.parent.mkdir(parents=True, exist_ok=True)
    exists = await git("rev-parse", "--verify", "-q", f"refs/heads/{branch}", cwd=top, check=False)
    args = [str(dest), branch] if exists.strip() else ["-b", branch, str(dest), head]
    try:
        await git("worktree", "add", "--quiet", *args, cwd=top)
    except GitError as exc:
        raise FailedPreconditionError(
            f"cannot make a worktree of {top} on branch {branch}: {exc}. Pick another branch "
            "with --branch"
        ) from exc
    try:
        if with_changes:
            await _carry_changes(top, dest)
    except BaseException:
        await git("worktree", "remove", "--force", str(dest), cwd=top, check=False)
        if not exists.strip():
            await git("branch", "-D", branch, cwd=top, check=False)
        raise
    base = (await git("rev-parse", "HEAD", cwd=dest)).strip()
    return WorkspaceSource(
        kind="git",
        origin=str(folder),
        branch=branch,
        path=str(dest),
        repo=str(top),
        base_commit=base,
    )


async def _carry_changes(top: Path, dest: Path) -> None:
    """The checkout's uncommitted changes (staged, unstaged, untracked but not ignored)
    made in the new worktree too, uncommitted there as well."""
    # A throwaway commit: an identity of its own, whether or not the user has one set.
    ident = ("-c", "user.name=vendetta", "-c", "user.email=vendetta@localhost")
    stash = (await git(*ident, "stash", "create", cwd=top)).strip()
    if stash:
        await git("stash", "apply", "--quiet", stash, cwd=dest)
    untracked = await git("ls-files", "-o", "--exclude-standard", "-z", cwd=top)
    for rel in filter(None, untracked.split("\0")):
        src, dst = top / rel, dest / rel
        await asyncio.to_thread(_copy, src, dst)


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_file():
        shutil.copy2(src, dst)


async def git_dir(src: WorkspaceSource) -> str:
    """The repository's git directory a worktree's .git file points into ("" for a
    clone or a folder, whose .git, if any, is inside): mounted beside the worktree so
    git works inside the environment too."""
    if src.kind != "git" or not src.repo:
        return ""
    out = await git("rev-parse", "--path-format=absolute", "--git-common-dir", cwd=Path(src.path))
    return out.strip()


async def unkept(src: WorkspaceSource) -> str:
    """What removing the workspace's copy on this machine would lose; "" when nothing."""
    if src.kind != "git" or not Path(src.path).is_dir():
        return ""
    path = Path(src.path)
    dirty = await git("status", "--porcelain", cwd=path, check=False)
    if dirty.strip():
        n = len(dirty.strip().splitlines())
        return (
            f"its worktree {path} has {n} uncommitted change(s): commit them on branch "
            f"{src.branch} (which is kept)"
        )
    if not src.repo:  # a clone: its commits are nowhere else unless pushed to the URL
        ahead = await git("rev-list", "--count", "HEAD", "--not", "--remotes", cwd=path)
        if int(ahead.strip() or 0):
            return (
                f"branch {src.branch} of its clone of {src.origin} holds {ahead.strip()} "
                "commit(s) that are not pushed there: push them from the workspace"
            )
    return ""


async def remove(src: WorkspaceSource) -> str:
    """Remove the worktree or clone; what is kept, for the user ("" when nothing)."""
    path = Path(src.path)
    if src.kind != "git":
        return ""
    if not src.repo:
        await asyncio.to_thread(shutil.rmtree, path, True)
        return ""
    top = Path(src.repo)
    if top.is_dir():
        await git("worktree", "remove", "--force", str(path), cwd=top, check=False)
    await asyncio.to_thread(shutil.rmtree, path, True)
    if not top.is_dir():
        return ""
    await git("worktree", "prune", cwd=top, check=False)
    # The branch goes too when every commit on it is on another branch as well.
    ahead = await git(
        "rev-list", "--count", f"refs/heads/{src.branch}", "--not",
        f"--exclude={src.branch}", "--branches", "--remotes", "--tags",
        cwd=top, check=False,
    )  # fmt: skip
    if ahead.strip() == "0":
        await git("branch", "-D", src.branch, cwd=top, check=False)
        return ""
    if ahead.strip():
        return f"branch {src.branch} of {top} is kept ({ahead.strip()} commit(s) only there)"
    return ""
