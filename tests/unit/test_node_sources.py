"""A workspace's source at the agent (nodeagent/sources.py), through the real gRPC wire:
whole and delta uploads, what is sent back, and uploads that must change nothing."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import tarfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import grpc.aio
import pytest

from nodeagent.providers import ProviderSet
from nodeagent.server import AgentServer
from tests.support.fakes import FakeProvider, short_tmp_dir
from vendetta.v1 import nodeagent_pb2, nodeagent_pb2_grpc

if TYPE_CHECKING:
    from vendetta.v1.nodeagent_pb2_grpc import NodeAgentAsyncStub

Entry = Callable[[tarfile.TarFile], None]


def file(name: str, data: bytes, mode: int = 0o644) -> Entry:
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), mode, int(time.time())
        tar.addfile(info, io.BytesIO(data))

    return add


def special(name: str, kind: bytes, target: str = "") -> Entry:
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, target
        tar.addfile(info)

    return add


def make_tar(*entries: Entry) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for entry in entries:
            entry(tar)
    return buf.getvalue()


async def put(
    stub: NodeAgentAsyncStub,
    data: bytes,
    *,
    ws: str = "ws",
    replace: bool = True,
    deleted: tuple[str, ...] = (),
    size: int | None = None,
) -> nodeagent_pb2.SourceReceipt:
    start = nodeagent_pb2.SourceUploadStart(
        workspace=ws,
        replace=replace,
        deleted=deleted,
        size_bytes=len(data) if size is None else size,
    )

    async def uploads() -> AsyncIterator[nodeagent_pb2.SourceUpload]:
        yield nodeagent_pb2.SourceUpload(start=start)
        for i in range(0, len(data), 1000):
            yield nodeagent_pb2.SourceUpload(chunk=data[i : i + 1000])

    return await stub.PutSource(uploads())


async def get(stub: NodeAgentAsyncStub, since: int = 0, ws: str = "ws") -> dict[str, bytes]:
    data = b"".join(
        [
            c.data
            async for c in stub.GetSource(
                nodeagent_pb2.GetSourceRequest(workspace=ws, since_unix_nano=since)
            )
        ]
    )
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        got = {
            m.name: (tar.extractfile(m).read() if m.isfile() else b"")  # type: ignore[union-attr]
            for m in tar.getmembers()
        }
        if listing := tar.pax_headers.get("VENDETTA.present"):  # what is there, after the rest
            assert got.pop(".") == b""
            got["(present)"] = ",".join(sorted(json.loads(listing))).encode()
        return got


def tree(folder: Path) -> dict[str, bytes]:
    found = {}
    for base, _, files in os.walk(folder):
        for name in files:
            path = Path(base) / name
            found[path.relative_to(folder).as_posix()] = path.read_bytes()
    return found


@pytest.fixture
async def agent() -> AsyncIterator[tuple[NodeAgentAsyncStub, Path]]:
    root = short_tmp_dir()
    server = AgentServer(root / "agent", providers=ProviderSet({"docker": FakeProvider()}))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"unix:{server.socket}") as channel:
            yield nodeagent_pb2_grpc.NodeAgentStub(channel), root
    finally:
        await server.stop(grace=0.2)
        shutil.rmtree(root, ignore_errors=True)


async def test_whole_upload_then_delta_then_replace(
    agent: tuple[NodeAgentAsyncStub, Path],
) -> None:
    stub, root = agent
    data = make_tar(file("a.txt", b"A"), file("src/b.py", b"B"), file("run.sh", b"#!", 0o755))
    receipt = await put(stub, data)
    folder = Path(receipt.path)
    assert folder == root / "agent" / "sources" / "ws"
    assert (receipt.files, receipt.bytes) == (3, len(data))
    assert tree(folder) == {"a.txt": b"A", "src/b.py": b"B", "run.sh": b"#!"}
    assert os.access(folder / "run.sh", os.X_OK)
    inode = folder.stat().st_ino

    # A delta: one removed, one changed, one new; the rest stays.
    receipt = await put(
        stub,
        make_tar(file("src/b.py", b"B2"), file("new/c.txt", b"C")),
        replace=False,
        deleted=("a.txt",),
    )
    assert receipt.files == 2
    assert tree(folder) == {"src/b.py": b"B2", "run.sh": b"#!", "new/c.txt": b"C"}

    # Only deletions: no tar at all.
    await put(stub, b"", replace=False, deleted=("new",))
    assert tree(folder) == {"src/b.py": b"B2", "run.sh": b"#!"}

    # A whole source again: what it lacks is gone, and the folder is the same one
    # (a running environment's mount holds it).
    await put(stub, make_tar(file("only.txt", b"O")))
    assert tree(folder) == {"only.txt": b"O"}
    assert folder.stat().st_ino == inode
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]


async def test_no_dependence_on_tarfiles_own_filter(
    agent: tuple[NodeAgentAsyncStub, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nodes may run Python 3.11 before 3.11.4, whose tarfile has no extraction filters."""
    stub, _ = agent
    for name in ("data_filter", "FilterError"):  # what an older tarfile lacks
        monkeypatch.delattr(tarfile, name, raising=False)
    folder = Path((await put(stub, make_tar(file("a.txt", b"A"), file("s/b", b"B")))).path)
    assert tree(folder) == {"a.txt": b"A", "s/b": b"B"}
    with pytest.raises(grpc.aio.AioRpcError):
        await put(stub, UNSAFE["link chain out"])
    assert tree(folder) == {"a.txt": b"A", "s/b": b"B"}


async def test_modes_are_tamed(agent: tuple[NodeAgentAsyncStub, Path]) -> None:
    stub, _ = agent
    data = make_tar(file("suid", b"x", 0o4777), file("ro", b"y", 0o444))
    folder = Path((await put(stub, data)).path)
    assert (folder / "suid").stat().st_mode & 0o7777 == 0o755
    assert (folder / "ro").stat().st_mode & 0o7777 == 0o644
    assert (folder / "suid").stat().st_uid == os.geteuid()


async def test_get_sends_everything_or_what_changed_since(
    agent: tuple[NodeAgentAsyncStub, Path],
) -> None:
    stub, _ = agent
    receipt = await put(stub, make_tar(file("a.txt", b"A"), file("d/b.txt", b"B")))
    folder = Path(receipt.path)
    everything = await get(stub)
    assert everything["a.txt"] == b"A" and everything["d/b.txt"] == b"B" and "d" in everything

    since = time.time_ns()
    (folder / "d" / "b.txt").write_bytes(b"changed inside")
    (folder / "new.txt").write_bytes(b"N")
    future = since + 10**9  # mtimes in the future of `since` only
    os.utime(folder / "d" / "b.txt", ns=(future, future))
    os.utime(folder / "new.txt", ns=(future, future))
    os.utime(folder / "a.txt", ns=(since - 10**9, since - 10**9))
    assert await get(stub, since) == {
        "d/b.txt": b"changed inside",
        "new.txt": b"N",
        "(present)": b"a.txt,d/b.txt,new.txt",  # a.txt unchanged; deleted ones not listed
    }


UNSAFE = {
    "dot-dot": make_tar(file("../escaped.txt", b"x")),
    "absolute": make_tar(file("/tmp/vd-escaped-abs.txt", b"x")),
    "link out": make_tar(special("link", tarfile.SYMTYPE, "/etc")),
    "relative link out": make_tar(special("link", tarfile.SYMTYPE, "../../..")),
    "write through a link": make_tar(
        special("link", tarfile.SYMTYPE, ".."), file("link/escaped.txt", b"x")
    ),
    "hard link out": make_tar(special("hard", tarfile.LNKTYPE, "/etc/passwd")),
    "relative hard link out": make_tar(special("hard", tarfile.LNKTYPE, "../../../etc/passwd")),
    # Each link inside by itself, out through the other: `a` is `b/c/../..` where
    # `b/c` is `b`, so `a` is the folder's parent.
    "link chain out": make_tar(
        special("b", tarfile.DIRTYPE),
        special("b/c", tarfile.SYMTYPE, "."),
        special("a", tarfile.SYMTYPE, "b/c/../.."),
        file("a/escaped.txt", b"x"),
    ),
    "fifo": make_tar(special("fifo", tarfile.FIFOTYPE)),
    "device": make_tar(special("dev", tarfile.CHRTYPE)),
    "not a tar": b"this is not a tar archive at all" * 40,
}


@pytest.mark.parametrize("name", list(UNSAFE))
async def test_an_unsafe_upload_changes_nothing(
    agent: tuple[NodeAgentAsyncStub, Path], name: str
) -> None:
    stub, _ = agent
    folder = Path((await put(stub, make_tar(file("keep.txt", b"K")))).path)
    for replace in (True, False):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await put(stub, UNSAFE[name], replace=replace, deleted=("keep.txt",))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert tree(folder) == {"keep.txt": b"K"}
    assert not (folder.parent / "escaped.txt").exists()
    assert not (folder.parent.parent / "escaped.txt").exists()
    assert not Path("/tmp/vd-escaped-abs.txt").exists()
    assert sorted(p.name for p in folder.parent.iterdir()) == ["ws"]


async def test_a_short_or_long_upload_changes_nothing(
    agent: tuple[NodeAgentAsyncStub, Path],
) -> None:
    stub, _ = agent
    folder = Path((await put(stub, make_tar(file("keep.txt", b"K")))).path)
    data = make_tar(file("new.txt", b"N" * 5000))
    for size, words in ((len(data) + 10, "ended after"), (len(data) - 10, "more than")):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await put(stub, data, size=size)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert words in (info.value.details() or "")
        assert tree(folder) == {"keep.txt": b"K"}
    # What a failed upload staged goes too (once its extraction has ended).
    for _ in range(200):
        if sorted(p.name for p in folder.parent.iterdir()) == ["ws"]:
            break
        await asyncio.sleep(0.05)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["ws"]


async def test_an_upload_much_larger_than_a_pipe_streams_through(
    agent: tuple[NodeAgentAsyncStub, Path],
) -> None:
    stub, _ = agent
    files = [file(f"d{i}/f{j}", os.urandom(3000)) for i in range(20) for j in range(50)]
    receipt = await put(stub, make_tar(*files))
    assert receipt.files == 1000
    assert len(tree(Path(receipt.path))) == 1000


async def test_a_sparse_file_is_refused(agent: tuple[NodeAgentAsyncStub, Path]) -> None:
    """A sparse member would write more than the tar holds: not taken."""
    stub, root = agent
    work = root / "sparse"
    work.mkdir()
    with (work / "big").open("wb") as f:
        f.truncate(50 * 2**20)
    proc = await asyncio.create_subprocess_exec(
        "tar", "--sparse", "-C", str(work), "-cf", str(root / "sparse.tar"), "big"
    )
    assert await proc.wait() == 0
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await put(stub, (root / "sparse.tar").read_bytes())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sparse" in (info.value.details() or "")


async def test_bad_requests_are_refused(agent: tuple[NodeAgentAsyncStub, Path]) -> None:
    stub, _ = agent
    for ws, deleted in (("Bad/Name", ()), ("ws", ("../x",)), ("ws", ("/etc",))):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await put(stub, b"", ws=ws, replace=False, deleted=deleted)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await get(stub, ws="absent")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "push" in (info.value.details() or "")


async def test_delete_removes_the_folder(agent: tuple[NodeAgentAsyncStub, Path]) -> None:
    stub, _ = agent
    folder = Path((await put(stub, make_tar(file("a", b"A")))).path)
    await stub.DeleteSource(nodeagent_pb2.DeleteSourceRequest(workspace="ws"))
    assert not folder.exists()
    await stub.DeleteSource(nodeagent_pb2.DeleteSourceRequest(workspace="ws"))  # absent: fine


@pytest.mark.skipif(os.geteuid() != 0, reason="needs a file of another user")
async def test_files_the_agent_cannot_remove_are_named(
    agent: tuple[NodeAgentAsyncStub, Path],
) -> None:
    """An agent that is not root, with a folder root made inside the source: refused
    with a message saying why, not a crash. (The agent here is root: an immutable
    file stands for one it may not remove.)"""
    stub, _ = agent
    folder = Path((await put(stub, make_tar(file("d/a", b"A")))).path)
    os.chmod(folder / "d", 0o500)
    proc = await asyncio.create_subprocess_exec("chattr", "+i", str(folder / "d" / "a"))
    if await proc.wait() != 0:
        pytest.skip("chattr is not available on this filesystem")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.DeleteSource(nodeagent_pb2.DeleteSourceRequest(workspace="ws"))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "cannot remove the source" in (info.value.details() or "")
    finally:
        await (await asyncio.create_subprocess_exec("chattr", "-i", str(folder / "d" / "a"))).wait()
        os.chmod(folder / "d", 0o700)
