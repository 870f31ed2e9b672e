"""Bringing a remote workspace's work back, and telling what destroying it would lose.

- pull: a git source's commits, fetched through a local mirror of the node's `.git`
  (kept up to date from the node's files changed since the last transfer) into the
  workspace's branch, fast-forwarded; a plain folder's changed files, refusing to
  overwrite files changed here as well without force.
- unpulled, node_changes: commits and files of the node's copy that are nowhere else.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

from common.errors import FailedPreconditionError
from coordinator import source_pack as pack
from coordinator.agent_client import AgentClient
from coordinator.models import Transfer, WorkspaceSource
from coordinator.source_git import GitError, git
from coordinator.source_pack import human
from coordinator.source_transfer import (
    CLOCK_MARGIN_NS,
    MAX_PATHS,
    PROGRESS_EVERY,
    Progress,
    make_mirror,
    manifest_path,
    mirror_dir,
    state_dir,
)

# What the node's agent lists every file it has under, in a changes-only tar's pax
# global header (nodeagent/source_tar.py).
PRESENT_KEY = "VENDETTA.present"


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
    mirror = mirror_dir(home, name)
    if not (mirror / ".git").is_dir():
        await make_mirror(home, name, src)
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


async def node_changes(
    home: Path, name: str, src: WorkspaceSource, client: AgentClient
) -> list[str]:
    """Files changed in the node's copy since the last transfer that are nowhere else:
    neither what was last sent or received nor what is here now (ignored ones aside)."""
    since = max(0, src.last_transfer_unix_nano - CLOCK_MARGIN_NS)
    spool, _ = await _receive(client, name, since, state_dir(home, name), lambda _t: None)
    try:
        return await asyncio.to_thread(_differing, home, name, Path(src.path), spool)
    finally:
        spool.unlink(missing_ok=True)


def _differing(home: Path, name: str, root: Path, spool: Path) -> list[str]:
    sent = pack.Manifest.load(manifest_path(home, name))
    found = []
    with spool.open("rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for m in tar:
            if not m.isfile() or not pack.not_ignored(root, m.name):
                continue
            data = tar.extractfile(m)
            assert data is not None
            h = hashlib.sha256()
            while block := data.read(pack.CHUNK):
                h.update(block)
            digest = h.hexdigest()
            was = sent.files.get(m.name)
            here = root / m.name
            if (was is None or was[2] != digest) and not (
                here.is_file() and pack.hash_file(here) == digest
            ):
                found.append(m.name)
    return sorted(found)


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
    await asyncio.to_thread(_record, manifest_path(home, name), repo, paths)
    t.paths = paths[:MAX_PATHS]
    t.summary = (
        f"pulled {new} commit(s) onto branch {src.branch} (now {head}), "
        f"{human(t.bytes)} received in {t.seconds:.1f}s"
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
    path = manifest_path(home, name)
    sent = pack.Manifest.load(path)
    headers: dict[str, str] = {}
    with tempfile.TemporaryDirectory(dir=spool.parent) as tmp:
        with spool.open("rb") as f:
            got = pack.extract(
                f, Path(tmp), lambda n: n if pack.not_ignored(root, n) else None, headers
            )
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
        deleted = _deleted(root, sent, headers.get(PRESENT_KEY), conflicts)
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
        for rel in deleted:
            (root / rel).unlink(missing_ok=True)
            sent.files.pop(rel, None)
    sent.save(path)
    t.files, t.done = len(changed) + len(deleted), True
    t.paths = sorted(changed + deleted)[:MAX_PATHS]
    gone = f", {len(deleted)} deleted" if deleted else ""
    t.summary = (
        f"pulled {len(changed)} changed file(s){gone} ({human(t.bytes)} received)"
        if changed or deleted
        else "nothing to pull: no file changed in the workspace"
    )
    return t


def _deleted(
    root: Path, sent: pack.Manifest, present: str | None, conflicts: list[str]
) -> list[str]:
    """Files last sent or received that the workspace no longer has (the node lists what
    it has; an agent that does not: none). One changed here since is a conflict."""
    if present is None:
        return []
    there = set(json.loads(present))
    deleted = []
    for rel, (_size, _mtime, digest) in sent.files.items():
        here = root / rel
        if rel in there or not (here.is_file() or here.is_symlink()):
            continue
        local = os.readlink(here) if here.is_symlink() else pack.hash_file(here)
        if local != digest:
            conflicts.append(rel)  # changed here, deleted there
        deleted.append(rel)
    return sorted(deleted)
