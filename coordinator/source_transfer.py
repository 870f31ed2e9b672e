"""Shipping a workspace's source to a node that does not share this machine's disk,
and bringing its changes back.

- ship: the whole source once, as a tar: the files the ignore rules let through and,
  for a git source, a standalone repository (`.git/`, a clone of the workspace's branch
  made here) so that inside the workspace is a real repository on its branch, with no
  git needed on the node.
- push: the files changed since the last transfer (a delta tar and what was deleted),
  against the manifest of what was sent.
- pull: a git source's commits, fetched through a local mirror of the node's `.git`
  (kept up to date from the node's changed files) into the workspace's branch; a plain
  folder's changed files, refusing to overwrite local changes without force.

State per workspace under the coordinator's home: sources/NAME/{manifest.json, mirror/}.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from common.errors import FailedPreconditionError
from coordinator import source_pack as pack
from coordinator.agent_client import AgentClient
from coordinator.models import Transfer, WorkspaceSource
from coordinator.source_git import GitError, git

Progress = Callable[[Transfer], None]
# Files on the node changed up to this long before our last transfer are asked for
# again: the node's clock is not ours (more is fetched, never less).
CLOCK_MARGIN_NS = 120 * 10**9
PROGRESS_EVERY = 0.25
MAX_PATHS = 200


def state_dir(home: Path, name: str) -> Path:
    return home / "sources" / name


def forget(home: Path, name: str) -> None:
    shutil.rmtree(state_dir(home, name), ignore_errors=True)


def _manifest_path(home: Path, name: str) -> Path:
    return state_dir(home, name) / "manifest.json"


def _mirror(home: Path, name: str) -> Path:
    return state_dir(home, name) / "mirror"


def _human(n: float) -> str:
    return pack._human(n)


def _summary(verb: str, t: Transfer) -> str:
    rate = t.bytes / t.seconds if t.seconds > 0 else 0.0
    return f"{verb} {t.files} files ({_human(t.bytes)}) in {t.seconds:.1f}s ({_human(rate)}/s)" + (
        f", {t.deleted} deleted" if t.deleted else ""
    )


async def _metered(
    chunks: AsyncIterator[bytes], stats: pack.PackStats, t: Transfer, progress: Progress
) -> AsyncIterator[bytes]:
    start = last = time.monotonic()
    async for chunk in chunks:
        yield chunk
        now = time.monotonic()
        t.files, t.bytes, t.seconds = stats.files, stats.bytes, now - start
        if now - last >= PROGRESS_EVERY:
            last = now
            progress(Transfer(**{**t.__dict__, "paths": []}))
    t.files, t.bytes, t.seconds = stats.files, stats.bytes, time.monotonic() - start


async def _make_mirror(home: Path, name: str, src: WorkspaceSource) -> Path:
    """A standalone repository of the workspace's branch (no checkout, no remote of
    this machine's paths): what the node gets as `.git`, kept here to pull through."""
    mirror = _mirror(home, name)
    await asyncio.to_thread(shutil.rmtree, mirror, True)
    mirror.parent.mkdir(parents=True, exist_ok=True)
    await git(
        "clone", "--quiet", "--no-local", "--no-checkout", "--single-branch",
        "--branch", src.branch, src.path, str(mirror), timeout=900.0,
    )  # fmt: skip
    await git("remote", "remove", "origin", cwd=mirror)
    # The repository's own remotes (where the team's repository is) come along.
    repo = Path(src.repo or src.path)
    remotes = await git("remote", cwd=repo, check=False)
    for remote in remotes.split():
        url = (await git("remote", "get-url", remote, cwd=repo, check=False)).strip()
        if url:
            await git("remote", "add", remote, url, cwd=mirror, check=False)
    if not src.repo and src.origin and "origin" not in remotes.split():
        await git("remote", "add", "origin", src.origin, cwd=mirror, check=False)
    await git("read-tree", "HEAD", cwd=mirror)  # an index, so that `git status` is right
    return mirror


async def ship(
    home: Path,
    name: str,
    src: WorkspaceSource,
    client: AgentClient,
    max_bytes: int,
    max_files: int,
    progress: Progress,
) -> tuple[str, Transfer]:
    """Send the whole source; the folder on the node and what was sent."""
    root = Path(src.path)
    entries = await pack.list_files(root, src.kind)
    pack.check_limits(entries, root, max_bytes, max_files)
    parts = [(root, "", entries)]
    if src.kind == "git":
        mirror = await _make_mirror(home, name, src)
        parts.append(
            (mirror / ".git", ".git/", await asyncio.to_thread(pack.walk_all, mirror / ".git"))
        )
    size = pack.tar_size(parts)
    t = Transfer(
        direction="send",
        total_files=sum(len(p[2]) for p in parts),
        total_bytes=size,
    )
    stats = pack.PackStats()
    progress(Transfer(**{**t.__dict__}))
    receipt = await client.put_source(
        name,
        _metered(pack.tar_stream(parts, stats), stats, t, progress),
        replace=True,
        deleted=[],
        size_bytes=size,
    )
    await asyncio.to_thread(pack.Manifest(stats.hashes).save, _manifest_path(home, name))
    t.done, t.summary = True, _summary("sent", t)
    return receipt.path, t


async def push(
    home: Path,
    name: str,
    src: WorkspaceSource,
    client: AgentClient,
    max_bytes: int,
    max_files: int,
    progress: Progress,
) -> Transfer:
    """Send what changed here since the last transfer."""
    root = Path(src.path)
    entries = await pack.list_files(root, src.kind)
    pack.check_limits(entries, root, max_bytes, max_files)
    sent = await asyncio.to_thread(pack.Manifest.load, _manifest_path(home, name))
    changed, deleted, _same = pack.delta(entries, sent)
    send = []
    for e in changed:  # touched but the same: not sent again
        was = sent.files.get(e.rel)
        if (
            was
            and not e.link
            and was[0] == e.size
            and await asyncio.to_thread(pack.hash_file, root / e.rel) == was[2]
        ):
            sent.files[e.rel] = (e.size, e.mtime_ns, was[2])
            continue
        send.append(e)
    t = Transfer(direction="send", total_files=len(send), deleted=len(deleted))
    if send or deleted:
        parts = [(root, "", send)]
        t.total_bytes = pack.tar_size(parts)
        stats = pack.PackStats()
        await client.put_source(
            name,
            _metered(pack.tar_stream(parts, stats), stats, t, progress),
            replace=False,
            deleted=deleted,
            size_bytes=t.total_bytes,
        )
        for rel in deleted:
            sent.files.pop(rel, None)
        sent.files.update(stats.hashes)
    await asyncio.to_thread(sent.save, _manifest_path(home, name))
    t.done = True
    t.paths = sorted([e.rel for e in send] + deleted)[:MAX_PATHS]
    t.summary = _summary("pushed", t) if (send or deleted) else "nothing to push: no changes"
    return t


async def _receive(
    client: AgentClient, name: str, since: int, into: Path, progress: Progress
) -> tuple[Path, Transfer]:
    """The node's tar of files changed since ``since``, spooled to a file in ``into``."""
    into.mkdir(parents=True, exist_ok=True)
    fd, spool = tempfile.mkstemp(prefix="pull-", suffix=".tar", dir=into)
    t = Transfer(direction="receive")
    start = last = time.monotonic()
    f = await asyncio.to_thread(os.fdopen, fd, "wb")
    try:
        async for data in client.get_source(name, since):
            await asyncio.to_thread(f.write, data)
            t.bytes += len(data)
            t.seconds = time.monotonic() - start
            if time.monotonic() - last >= PROGRESS_EVERY:
                last = time.monotonic()
                progress(Transfer(**{**t.__dict__}))
    except BaseException:
        await asyncio.to_thread(f.close)
        Path(spool).unlink(missing_ok=True)
        raise
    await asyncio.to_thread(f.close)
    t.seconds = time.monotonic() - start
    return Path(spool), t


def _extract_git(spool: Path, mirror: Path) -> list[str]:
    with spool.open("rb") as f:
        return pack.extract(
            f, mirror / ".git", lambda n: n[5:] if n.startswith(".git/") and len(n) > 5 else None
        )


async def fetch_node_branch(
    home: Path, name: str, src: WorkspaceSource, client: AgentClient, progress: Progress
) -> tuple[str, Transfer]:
    """Bring the node's branch into the local repository as refs/vendetta/node/NAME
    (through the mirror); the ref, and what was received."""
    mirror = _mirror(home, name)
    if not (mirror / ".git").is_dir():
        await _make_mirror(home, name, src)
    since = max(0, src.last_transfer_unix_nano - CLOCK_MARGIN_NS)
    ref = f"refs/vendetta/node/{name}"
    repo = Path(src.path)
    for attempt_since in (since, 0):  # the second time: all of it (a clock far off)
        spool, t = await _receive(client, name, attempt_since, state_dir(home, name), progress)
        try:
            t.files = len(await asyncio.to_thread(_extract_git, spool, mirror))
        finally:
            spool.unlink(missing_ok=True)
        try:
            await git(
                "fetch",
                "--quiet",
                "--no-tags",
                str(mirror),
                f"+refs/heads/{src.branch}:{ref}",
                cwd=repo,
            )
            return ref, t
        except GitError:
            if attempt_since == 0:
                raise
    raise AssertionError("unreachable")


async def unpulled(home: Path, name: str, src: WorkspaceSource, client: AgentClient) -> int:
    """How many commits of the node's branch are nowhere in the local repository."""
    ref, _ = await fetch_node_branch(home, name, src, client, lambda _t: None)
    repo = Path(src.path)
    try:
        out = await git(
            "rev-list", "--count", ref, "--not", "--branches", "--remotes", "--tags", cwd=repo
        )
    finally:
        await git("update-ref", "-d", ref, cwd=repo, check=False)
    return int(out.strip() or 0)


async def pull(
    home: Path,
    name: str,
    src: WorkspaceSource,
    client: AgentClient,
    force: bool,
    progress: Progress,
) -> Transfer:
    if src.kind == "git":
        return await _pull_git(home, name, src, client, progress)
    return await _pull_folder(home, name, src, client, force, progress)


async def _pull_git(
    home: Path, name: str, src: WorkspaceSource, client: AgentClient, progress: Progress
) -> Transfer:
    ref, t = await fetch_node_branch(home, name, src, client, progress)
    repo = Path(src.path)
    new = int((await git("rev-list", "--count", f"HEAD..{ref}", cwd=repo)).strip() or 0)
    t.done = True
    if new == 0:
        await git("update-ref", "-d", ref, cwd=repo, check=False)
        t.summary = f"nothing to pull: branch {src.branch} has every commit of the workspace"
        return t
    ahead = int((await git("rev-list", "--count", f"{ref}..HEAD", cwd=repo)).strip() or 0)
    if ahead:
        raise FailedPreconditionError(
            f"branch {src.branch} has {ahead} commit(s) here that the workspace does not, and "
            f"it has {new} that are not here: they are fetched as {ref} in {repo}; merge "
            f"them there (`git -C {repo} merge {ref}`)"
        )
    try:
        await git("merge", "--ff-only", "--quiet", ref, cwd=repo)
    except GitError as exc:
        raise FailedPreconditionError(
            f"the workspace's {new} new commit(s) are fetched as {ref}, but {repo} could not "
            f"move to them ({exc}): commit or drop the changes there, then pull again"
        ) from exc
    await git("update-ref", "-d", ref, cwd=repo, check=False)
    head = (await git("rev-parse", "--short", "HEAD", cwd=repo)).strip()
    changed = await git("diff", "--name-only", "-z", f"HEAD~{new}", "HEAD", cwd=repo, check=False)
    paths = sorted(filter(None, changed.split("\0")))
    # What the merge brought is what the node has: the same on both sides for push.
    await asyncio.to_thread(_record, _manifest_path(home, name), repo, paths)
    t.paths = paths[:MAX_PATHS]
    t.summary = (
        f"pulled {new} commit(s) onto branch {src.branch} (now {head}), "
        f"{_human(t.bytes)} received in {t.seconds:.1f}s"
    )
    return t


def _record(manifest_path: Path, root: Path, paths: list[str]) -> None:
    """Record ``paths`` as they are now in ``root`` as the same on the node (or gone)."""
    sent = pack.Manifest.load(manifest_path)
    present = {e.rel: e for e in pack._stat_all(root, paths)}
    for rel in paths:
        e = present.get(rel)
        if e is None:
            sent.files.pop(rel, None)
        else:
            sent.files[rel] = (e.size, e.mtime_ns, e.link or pack.hash_file(root / rel))
    sent.save(manifest_path)


async def _pull_folder(
    home: Path,
    name: str,
    src: WorkspaceSource,
    client: AgentClient,
    force: bool,
    progress: Progress,
) -> Transfer:
    root = Path(src.path)
    since = max(0, src.last_transfer_unix_nano - CLOCK_MARGIN_NS)
    spool, t = await _receive(client, name, since, state_dir(home, name), progress)
    try:
        return await asyncio.to_thread(_apply_folder, home, name, root, spool, t, force)
    finally:
        spool.unlink(missing_ok=True)


def _apply_folder(
    home: Path, name: str, root: Path, spool: Path, t: Transfer, force: bool
) -> Transfer:
    manifest_path = _manifest_path(home, name)
    sent = pack.Manifest.load(manifest_path)
    with tempfile.TemporaryDirectory(dir=spool.parent) as tmp:
        with spool.open("rb") as f:
            got = pack.extract(f, Path(tmp), lambda n: n if pack.not_ignored(root, n) else None)
        incoming = {
            rel: pack.hash_file(Path(tmp) / rel)
            for rel in got
            if not (Path(tmp) / rel).is_symlink()
        }
        changed, conflicts = [], []
        for rel, digest in incoming.items():
            here = root / rel
            local = pack.hash_file(here) if here.is_file() and not here.is_symlink() else None
            if local == digest:
                continue
            changed.append(rel)
            was = sent.files.get(rel)
            if local is not None and (was is None or was[2] != local):
                conflicts.append(rel)  # changed here since it was last sent or received
        if conflicts and not force:
            shown = ", ".join(conflicts[:10]) + (" ..." if len(conflicts) > 10 else "")
            raise FailedPreconditionError(
                f"{len(conflicts)} file(s) changed both here and in the workspace: {shown}. "
                "Nothing was written; keep yours with `vendetta workspace push` (the "
                "workspace gets them), or take the workspace's with `pull --force`"
            )
        for rel in changed:
            dest = root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(tmp) / rel, dest)
            st = dest.stat()
            sent.files[rel] = (st.st_size, st.st_mtime_ns, incoming[rel])
    sent.save(manifest_path)
    t.files, t.done = len(changed), True
    t.paths = sorted(changed)[:MAX_PATHS]
    t.summary = (
        f"pulled {len(changed)} changed file(s) ({_human(t.bytes)} received)"
        if changed
        else "nothing to pull: no file changed in the workspace"
    )
    return t
