"""What of a source is sent: ignore files, limits, the tar and its size, manifests and
deltas; then ship, push and pull against an agent that keeps the source in a folder
(a fake of the agent's three source calls, with their contract's semantics)."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import pytest

from common.errors import FailedPreconditionError
from coordinator import source_pack as pack
from coordinator import source_pull, source_transfer
from coordinator.agent_client import AgentClient
from coordinator.models import Transfer, WorkspaceSource
from coordinator.source_git import resolve
from tests.unit.test_source_git import commit, sh
from vendetta.v1 import nodeagent_pb2


def tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


async def test_a_folder_honours_nested_gitignore_and_vendettaignore(tmp_path: Path) -> None:
    tree(
        tmp_path,
        {
            ".gitignore": "*.log\nbuild/\n",
            ".vendettaignore": "secrets.env\n",
            "src/.gitignore": "gen/\n!keep.log\n",
            "src/app.py": "a",
            "src/keep.log": "k",
            "src/other.log": "o",
            "src/gen/out.py": "g",
            "build/x": "b",
            "secrets.env": "s",
            "README": "r",
            "gen/top.py": "not under src: kept",
        },
    )
    (tmp_path / "link").symlink_to("README")
    got = {e.rel for e in await pack.list_files(tmp_path, "folder")}
    assert got == {
        ".gitignore",
        ".vendettaignore",
        "src/.gitignore",
        "src/app.py",
        "src/keep.log",
        "README",
        "gen/top.py",
        "link",
    }
    assert pack.not_ignored(tmp_path, "src/app.py")
    assert not pack.not_ignored(tmp_path, "src/gen/x.py")
    assert not pack.not_ignored(tmp_path, "build/x")
    assert not pack.not_ignored(tmp_path, ".git/config")


async def test_a_git_source_sends_tracked_and_untracked_not_ignored(tmp_path: Path) -> None:
    repo = tmp_path / "r"
    repo.mkdir()
    sh("git", "init", "-q", cwd=repo)
    tree(repo, {".gitignore": "*.log\n", "a.py": "a", ".vendettaignore": "big/\n"})
    commit(repo)
    tree(repo, {"new.py": "n", "x.log": "l", "big/blob": "b"})
    got = {e.rel for e in await pack.list_files(repo, "git")}
    assert got == {".gitignore", ".vendettaignore", "a.py", "new.py"}


def test_over_the_limit_names_the_largest(tmp_path: Path) -> None:
    entries = [pack.Entry(f"node_modules/m{i}", 1000, 0) for i in range(50)]
    entries += [pack.Entry("src/a.py", 10, 0), pack.Entry("data.bin", 20_000, 0)]
    pack.check_limits(entries, tmp_path, 10**6, 100)
    with pytest.raises(FailedPreconditionError) as exc:
        pack.check_limits(entries, tmp_path, 30_000, 100)
    msg = str(exc.value)
    assert "over the limit" in msg and "node_modules/ (48.8 KiB, 50 files)" in msg
    assert msg.index("node_modules/") < msg.index("data.bin") < msg.index("src/")
    assert ".vendettaignore" in msg and "source.max_size" in msg
    with pytest.raises(FailedPreconditionError, match="52 files, over the limit"):
        pack.check_limits(entries, tmp_path, 10**6, 10)


async def test_the_tar_is_the_size_announced_and_holds_the_files(tmp_path: Path) -> None:
    long_name = "d/" + "x" * 150 + ".txt"
    tree(tmp_path, {"a.txt": "hello", long_name: "long", "e/empty": "", "é.txt": "u"})
    (tmp_path / "big").write_bytes(os.urandom(3 * pack.CHUNK + 7))
    (tmp_path / "ln").symlink_to("a.txt")
    entries = await pack.list_files(tmp_path, "folder")
    parts = [(tmp_path, "", entries)]
    stats = pack.PackStats()
    data = b"".join([c async for c in pack.tar_stream(parts, stats)])
    assert len(data) == pack.tar_size(parts) == stats.bytes
    assert stats.files == len(entries) == 6
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = {m.name: m for m in tar.getmembers()}
        assert set(names) == {e.rel for e in entries}
        assert names["ln"].issym() and names["ln"].linkname == "a.txt"
        big = tar.extractfile("big")
        assert big is not None and big.read() == (tmp_path / "big").read_bytes()
    assert stats.hashes["a.txt"][2] == pack.hash_file(tmp_path / "a.txt")


def test_delta_against_the_manifest(tmp_path: Path) -> None:
    sent = pack.Manifest({"same": (1, 10, "h"), "changed": (1, 10, "h"), "gone": (1, 10, "h")})
    now = [pack.Entry("same", 1, 10), pack.Entry("changed", 2, 11), pack.Entry("new", 1, 1)]
    changed, deleted, same = pack.delta(now, sent)
    assert [e.rel for e in changed] == ["changed", "new"]
    assert deleted == ["gone"]
    assert [e.rel for e in same] == ["same"]
    sent.save(tmp_path / "m.json")
    assert pack.Manifest.load(tmp_path / "m.json") == sent
    assert pack.Manifest.load(tmp_path / "none.json").files == {}


class FolderAgent:
    """The agent's source calls over one folder per workspace (as the contract says)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.puts: list[nodeagent_pb2.SourceUploadStart] = []

    async def put_source(
        self,
        workspace: str,
        chunks: AsyncIterator[bytes],
        *,
        replace: bool,
        deleted: list[str],
        size_bytes: int,
    ) -> nodeagent_pb2.SourceReceipt:
        data = b"".join([c async for c in chunks])
        assert len(data) == size_bytes
        self.puts.append(
            nodeagent_pb2.SourceUploadStart(
                workspace=workspace, replace=replace, deleted=deleted, size_bytes=size_bytes
            )
        )
        folder = self.root / workspace
        if replace:
            shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        for rel in deleted:
            (folder / rel).unlink()
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(folder, filter="data")
            files = len(tar.getmembers())
        return nodeagent_pb2.SourceReceipt(path=str(folder), bytes=len(data), files=files)

    async def get_source(self, workspace: str, since_unix_nano: int) -> AsyncIterator[bytes]:
        buf = io.BytesIO()
        folder = self.root / workspace
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for path in sorted(folder.rglob("*")):
                st = path.lstat()
                if path.is_file() and st.st_mtime_ns > since_unix_nano:
                    tar.add(path, arcname=str(path.relative_to(folder)), recursive=False)
        data = buf.getvalue()
        for i in range(0, len(data), 1000):
            yield data[i : i + 1000]

    async def delete_source(self, workspace: str) -> None:
        shutil.rmtree(self.root / workspace)


def agent(tmp_path: Path) -> tuple[FolderAgent, AgentClient]:
    fake = FolderAgent(tmp_path / "node")
    return fake, cast(AgentClient, fake)


async def test_ship_push_pull_a_plain_folder(tmp_path: Path) -> None:
    home, local = tmp_path / "home", tmp_path / "local"
    tree(local, {".gitignore": "*.tmp\n", "a.txt": "a", "b.txt": "b", "junk.tmp": "j"})
    fake, client = agent(tmp_path)
    src = WorkspaceSource(kind="folder", path=str(local))
    seen: list[Transfer] = []
    path, done = await source_transfer.ship(home, "ws", src, client, 10**6, 100, seen.append)
    node = Path(path)
    assert sorted(p.name for p in node.iterdir()) == [".gitignore", "a.txt", "b.txt"]
    assert done.done and done.files == 3 and done.summary.startswith("sent 3 files")
    assert seen and seen[0].total_files == 3
    src.last_transfer_unix_nano = 1  # everything on the node is newer

    (local / "a.txt").write_text("a2")
    (local / "b.txt").unlink()
    (local / "c.txt").write_text("c")
    os.utime(local / ".gitignore")  # touched, not changed: not sent again
    pushed = await source_transfer.push(home, "ws", src, client, 10**6, 100, seen.append)
    assert (pushed.files, pushed.deleted, pushed.paths) == (2, 1, ["a.txt", "b.txt", "c.txt"])
    assert fake.puts[-1].replace is False and list(fake.puts[-1].deleted) == ["b.txt"]
    assert (node / "a.txt").read_text() == "a2" and not (node / "b.txt").exists()
    again = await source_transfer.push(home, "ws", src, client, 10**6, 100, seen.append)
    assert again.summary == "nothing to push: no changes" and len(fake.puts) == 2

    (node / "c.txt").write_text("c from inside")
    (node / "d.txt").write_text("d")
    (node / "x.tmp").write_text("ignored here")
    pulled = await source_pull.pull(home, "ws", src, client, False, seen.append)
    assert "pulled 2 changed file(s)" in pulled.summary
    assert (local / "c.txt").read_text() == "c from inside"
    assert (local / "d.txt").read_text() == "d" and not (local / "x.tmp").exists()

    # Changed on both sides: refused, nothing written, unless forced.
    (local / "a.txt").write_text("mine")
    (node / "a.txt").write_text("theirs")
    (node / "d.txt").write_text("d2")
    with pytest.raises(FailedPreconditionError, match="changed both here and in the workspace"):
        await source_pull.pull(home, "ws", src, client, False, seen.append)
    assert (local / "a.txt").read_text() == "mine" and (local / "d.txt").read_text() == "d"
    await source_pull.pull(home, "ws", src, client, True, seen.append)
    assert (local / "a.txt").read_text() == "theirs" and (local / "d.txt").read_text() == "d2"

    # What destroy would lose: files changed there that are nowhere else.
    assert await source_pull.node_changes(home, "ws", src, client) == []
    (node / "e.txt").write_text("only there")
    (node / "y.tmp").write_text("ignored")
    assert await source_pull.node_changes(home, "ws", src, client) == ["e.txt"]
    (local / "e.txt").write_text("only there")  # the same content here: not lost
    assert await source_pull.node_changes(home, "ws", src, client) == []


async def test_ship_and_pull_a_git_worktree(tmp_path: Path) -> None:
    home, repo = tmp_path / "home", tmp_path / "repo"
    repo.mkdir()
    sh("git", "init", "-q", "-b", "main", cwd=repo)
    tree(repo, {".gitignore": "*.log\n", "app.py": "v1"})
    commit(repo, "first")
    sh("git", "remote", "add", "upstream", "https://example.invalid/team/repo.git", cwd=repo)
    tree(repo, {"wip.py": "w", "x.log": "l"})
    src = await resolve(home, "ws", str(repo), "", True)
    _fake, client = agent(tmp_path)
    path, _ = await source_transfer.ship(home, "ws", src, client, 10**6, 1000, lambda _t: None)
    node = Path(path)
    # A standalone repository on the workspace's branch, the changes uncommitted in it.
    assert sh("git", "branch", "--show-current", cwd=node) == "vendetta/ws"
    assert sh("git", "status", "--porcelain", cwd=node) == "?? wip.py"
    assert not (node / "x.log").exists()
    assert "upstream" in sh("git", "remote", cwd=node)
    assert str(repo) not in (node / ".git" / "config").read_text()
    src.last_transfer_unix_nano = 1

    tree(node, {"inside.py": "made inside"})
    sh("git", "add", "inside.py", cwd=node)
    sh("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "inside", cwd=node)
    inside = sh("git", "rev-parse", "HEAD", cwd=node)
    assert await source_pull.unpulled(home, "ws", src, client) == 1
    pulled = await source_pull.pull(home, "ws", src, client, False, lambda _t: None)
    assert "pulled 1 commit(s) onto branch vendetta/ws" in pulled.summary
    assert sh("git", "rev-parse", "vendetta/ws", cwd=repo) == inside
    assert (Path(src.path) / "inside.py").read_text() == "made inside"
    assert await source_pull.unpulled(home, "ws", src, client) == 0
    # What the pull brought counts as on the node: deleting it here is pushed.
    (Path(src.path) / "inside.py").unlink()
    pushed = await source_transfer.push(home, "ws", src, client, 10**6, 1000, lambda _t: None)
    assert (pushed.paths, pushed.deleted) == (["inside.py"], 1)
    assert not (node / "inside.py").exists()
    again = await source_pull.pull(home, "ws", src, client, False, lambda _t: None)
    assert again.summary.startswith("nothing to pull")
