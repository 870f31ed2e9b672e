"""A workspace's source on a remote node (issue 17): the first upload of a git
repository, and a push after 10 files changed, against OpenSSH baselines of the same
tree on the same sshd in the same run.

- upload: `workspace create --source REPO` on node n1, from "sending the source" to
  the transfer's end (listing, the standalone .git, the tar streamed through the
  coordinator's tunnel to the agent, extracted there), versus
  `tar c -C REPO . | ssh node tar x` (the repository with its .git).
- push: 10 files of the workspace's worktree changed, `workspace push` to its end,
  versus `rsync -a` over ssh of the same change to a copy it synced before.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from bench.cluster import IMAGE, Cluster
from bench.stats import Series, row
from vendetta.v1 import coordinator_pb2 as pb

MB = 1_000_000


async def _sh(*argv: str, cwd: Path | None = None, shell: str = "") -> None:
    if shell:
        proc = await asyncio.create_subprocess_shell(
            shell, cwd=cwd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
    else:
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=cwd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{shell or ' '.join(argv)} failed: {err.decode()[-500:]}")


def _make_tree(root: Path, files: int, total: int) -> None:
    size = total // files
    for i in range(files):
        path = root / f"d{i // 100:03d}" / f"f{i:05d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))


async def _make_repo(root: Path, files: int, total: int) -> Path:
    repo = root / "repo"
    repo.mkdir()
    (repo / ".vendetta").mkdir()
    (repo / ".vendetta" / "config.yaml").write_text(
        yaml.safe_dump({"name": "bench-source", "docker": {"image": IMAGE}})
    )
    await asyncio.to_thread(_make_tree, repo, files, total)
    await _sh("git", "init", "-q", cwd=repo)
    await _sh("git", "add", "-A", cwd=repo)
    await _sh("git", "-c", "user.email=b@b", "-c", "user.name=b", "commit", "-qm", "tree", cwd=repo)
    return repo


async def _upload(cl: Cluster, name: str, repo: Path) -> tuple[float, str]:
    """Seconds from "sending the source" to the transfer's end; the worktree's path."""
    times: dict[str, int] = {}
    ended = asyncio.Event()

    async def watch() -> None:
        async for ev in cl.stub.WatchWorkspace(pb.WatchWorkspaceRequest(name=name)):
            if ev.message.startswith("sending the source"):
                times["start"] = ev.time_unix_nano
            if ev.HasField("transfer") and ev.transfer.done:
                times["end"] = ev.time_unix_nano
                ended.set()

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0.2)  # subscribed before the create starts
    try:
        config = (repo / ".vendetta" / "config.yaml").read_text()
        ws = await cl.stub.CreateWorkspace(
            pb.CreateWorkspaceRequest(name=name, node="n1", config_yaml=config, source=str(repo)),
            timeout=600,
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ended.wait(), 10)
    finally:
        watcher.cancel()
    if "start" not in times or "end" not in times:
        raise RuntimeError(f"no transfer events seen for {name}: {times}")
    return (times["end"] - times["start"]) / 1e9, ws.source.path


def _change(tree: Path, round_: int, count: int = 10) -> None:
    files = sorted(tree.glob("d000/*.bin"))[:count]
    for f in files:
        f.write_bytes(os.urandom(f.stat().st_size) + f"{round_}".encode())


async def run(cl: Cluster, quick: bool) -> dict[str, Any]:
    files, total = (2_000, 20 * MB) if quick else (10_000, 100 * MB)
    rounds = 2 if quick else 3
    push_rounds = 3 if quick else 8
    node = cl.nodes["n1"]
    work = cl.root / "source-bench"
    work.mkdir()
    repo = await _make_repo(work, files, total)
    ssh = node.ssh_argv()
    dest_host, ssh_cmd = ssh[-1], shlex.join(ssh[:-1])
    remote = work / "remote"  # the same machine: the node's sshd writes here
    label = f"{files:,} files, {total // MB} MB"
    up = Series(f"workspace create --source (git): upload, {label}", unit="ms")
    tar = Series(f"tar c | ssh node tar x, {label}", unit="ms")
    try:
        for i in range(rounds):
            name = f"bench-src-{i}"
            secs, _ = await _upload(cl, name, repo)
            up.seconds.append(secs)
            await cl.stub.DestroyWorkspace(pb.WorkspaceRequest(name=name, force=True))
            t0 = time.perf_counter()
            await _sh(
                shell=f"tar c -C {shlex.quote(str(repo))} . | {ssh_cmd} {dest_host} "
                f"'rm -rf {remote} && mkdir -p {remote} && tar x -C {remote}'"
            )
            tar.seconds.append(time.perf_counter() - t0)

        # push: one workspace kept, its worktree changed; rsync's copy synced first.
        _, worktree = await _upload(cl, "bench-src-push", repo)
        mirror = work / "rsync"
        rsync_e = shlex.quote(ssh_cmd)
        await _sh(shell=f"rsync -a -e {rsync_e} {worktree}/ {dest_host}:{mirror}/")
        push = Series("workspace push, 10 files changed", unit="ms")
        rsync = Series("rsync -a over ssh, 10 files changed", unit="ms")
        for r in range(push_rounds):
            await asyncio.to_thread(_change, Path(worktree), r)
            t0 = time.perf_counter()
            async for t in cl.stub.PushWorkspace(pb.SourceTransferRequest(name="bench-src-push")):
                if t.done and t.files != 10:
                    raise RuntimeError(f"push sent {t.files} files, not 10: {t.summary}")
            push.seconds.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await _sh(shell=f"rsync -a -e {rsync_e} {worktree}/ {dest_host}:{mirror}/")
            rsync.seconds.append(time.perf_counter() - t0)
        return {"rows": [row(tar), row(up, tar), row(rsync), row(push, rsync)]}
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)
