"""Image imports without an engine: the contract's checks, the file kinds read from
first bytes, and the agent spooling an upload (exactly the bytes announced, the
spool removed whatever happens)."""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import ClassVar

import pytest

from common import errors as e
from nodeagent.images import receive
from nodeagent.providers import ProviderSet
from providers.base import ImageInfo
from providers.checks import file_kind
from tests.support.fakes import FakeProvider
from vendetta.v1 import common_pb2


class Importer(FakeProvider):
    """Records the files it is given (their contents, read while they exist)."""

    image_formats: ClassVar[str] = "anything"

    def __init__(self) -> None:
        super().__init__(name="lxd")
        self.got: dict[str, bytes] = {}

    async def _import_image(self, name: str, files: Mapping[str, Path]) -> builtins.list[ImageInfo]:
        self.got = {n: p.read_bytes() for n, p in files.items()}
        return [ImageInfo(name=name, size_bytes=sum(map(len, self.got.values())))]


def _upload(
    files: dict[str, bytes], *, name: str = "img", chunk: int = 3, cut: int = 0
) -> AsyncIterator[common_pb2.ImageUpload]:
    start = common_pb2.ImageUploadStart(
        provider="lxd",
        name=name,
        files=[common_pb2.ImageFile(name=n, size_bytes=len(d)) for n, d in files.items()],
    )
    data = b"".join(files.values())
    data = data[: len(data) - cut]

    async def gen() -> AsyncIterator[common_pb2.ImageUpload]:
        yield common_pb2.ImageUpload(start=start)
        for i in range(0, len(data), chunk):
            yield common_pb2.ImageUpload(chunk=data[i : i + chunk])

    return gen()


async def test_an_upload_is_split_into_its_files_and_the_spool_removed(tmp_path: Path) -> None:
    p = Importer()
    files = {"meta.tar": b"0123456789", "x": b"y", "rootfs": b"abcdefg"}
    imported = await receive(_upload(files), ProviderSet({"lxd": p}), tmp_path)
    assert p.got == files
    assert [(i.provider, i.name, i.size_bytes) for i in imported] == [("lxd", "img", 18)]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("files", "cut", "said"),
    [
        ({"a": b"xyz"}, 1, "ended after 2 of 3 bytes"),
        ({"a/b": b"xyz"}, 0, "invalid file name"),
        ({"a": b""}, 0, "is empty"),  # the contract: no empty files
    ],
)
async def test_a_bad_upload_imports_nothing_and_leaves_no_spool(
    tmp_path: Path, files: dict[str, bytes], cut: int, said: str
) -> None:
    p = Importer()
    with pytest.raises(e.InvalidArgumentError, match=said):
        await receive(_upload(files, cut=cut), ProviderSet({"lxd": p}), tmp_path)
    assert p.got == {}
    assert list(tmp_path.iterdir()) == []


async def test_more_bytes_than_announced_are_refused(tmp_path: Path) -> None:
    async def gen() -> AsyncIterator[common_pb2.ImageUpload]:
        async for m in _upload({"a": b"xyz"}):
            yield m
        yield common_pb2.ImageUpload(chunk=b"extra")

    with pytest.raises(e.InvalidArgumentError, match="more than the 3 bytes"):
        await receive(gen(), ProviderSet({"lxd": Importer()}), tmp_path)
    assert list(tmp_path.iterdir()) == []


async def test_the_contract_checks_names_before_the_engine(tmp_path: Path) -> None:
    p = Importer()
    f = tmp_path / "f"
    f.write_bytes(b"x")
    with pytest.raises(e.InvalidArgumentError, match="needs a name"):
        await p.import_image("", {"f": f})
    with pytest.raises(e.InvalidArgumentError, match="invalid image name"):
        await p.import_image("../up", {"f": f})
    with pytest.raises(e.InvalidArgumentError, match="no files"):
        await p.import_image("img", {})
    with pytest.raises(e.InvalidArgumentError, match="not a file"):
        await p.import_image("img", {"g": tmp_path / "g"})
    assert p.got == {}


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (b"\x1f\x8b\x08" + b"\0" * 600, "gzip"),
        (b"hsqs" + b"\0" * 600, "squashfs"),
        (b"QFI\xfb" + b"\0" * 600, "qcow2"),
        (b"\0" * 257 + b"ustar\x0000" + b"\0" * 300, "tar"),
        (b"hello, world\n" * 40, ""),
    ],
)
def test_file_kinds_are_read_from_the_first_bytes(tmp_path: Path, head: bytes, kind: str) -> None:
    f = tmp_path / "f"
    f.write_bytes(head)
    assert file_kind(f) == kind
