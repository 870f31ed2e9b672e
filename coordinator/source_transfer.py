"""Shipping a workspace's source to a node that does not share this machine's disk,
and bringing its changes back.

- ship: the whole source once, as a tar: the files the ignore rules let through and,
  for a git source, a standalone repository (`.git/`, a clone of the workspace's branch
  made here) so that inside the workspace is a real repository on its branch, with no
  git needed on the node.
- push: the files changed since the last transfer (a delta tar and what was deleted),
  against the manifest of what was sent.
- pull (``source_pull``): what changed in the node's copy, back here.

State per workspace under the coordinator's home: sources/NAME/{manifest.json, mirror/}.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from coordinator import source_pack as pack
from coordinator.agent_client import AgentClient
from coordinator.models import Transfer, WorkspaceSource
from coordinator.source_git import git
from coordinator.source_pack import human

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


def manifest_path(home: Path, name: str) -> Path:
    return state_dir(home, name) / "manifest.json"


def mirror_dir(home: Path, name: str) -> Path:
    return state_dir(home, name) / "mirror"


def _summary(verb: str, t: Transfer) -> str:
    rate = t.bytes / t.seconds if t.seconds > 0 else 0.0
    return f"{verb} {t.files} files ({human(t.bytes)}) in {t.seconds:.1f}s ({human(rate)}/s)" + (
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


async def make_mirror(home: Path, name: str, src: WorkspaceSource) -> Path:
    """A standalone repository of the workspace's branch (no checkout, no remote of
    this machine's paths): what the node gets as `.git`, kept here to pull through."""
    mirror = mirror_dir(home, name)
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
        mirror = await make_mirror(home, name, src)
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
    await asyncio.to_thread(pack.Manifest(stats.hashes).save, manifest_path(home, name))
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
    sent = await asyncio.to_thread(pack.Manifest.load, manifest_path(home, name))
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
    await asyncio.to_thread(sent.save, manifest_path(home, name))
    t.done = True
    t.paths = sorted([e.rel for e in send] + deleted)[:MAX_PATHS]
    t.summary = _summary("pushed", t) if (send or deleted) else "nothing to push: no changes"
    return t
