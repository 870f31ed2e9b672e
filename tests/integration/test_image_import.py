"""Images through the agent's real gRPC wire, per engine: an image exported from the
engine's test image, imported under a new name, is listed and makes environments;
a file that is not what the engine takes is refused and leaves nothing behind."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from providers.qemu.images import DEFAULT_IMAGE_DIR, IMAGE_FILES
from tests.conftest import LXD_TEST_IMAGE, TEST_IMAGE
from tests.integration.test_provider_conformance import CASES, Agent, running_agent
from vendetta.v1 import common_pb2, nodeagent_pb2

CHUNK = 256 * 1024


def upload(provider: str, name: str, files: list[Path]) -> Iterator[common_pb2.ImageUpload]:
    yield common_pb2.ImageUpload(
        start=common_pb2.ImageUploadStart(
            provider=provider,
            name=name,
            files=[common_pb2.ImageFile(name=f.name, size_bytes=f.stat().st_size) for f in files],
        )
    )
    for f in files:
        with f.open("rb") as data:
            while block := data.read(CHUNK):
                yield common_pb2.ImageUpload(chunk=block)


async def stream(
    messages: Iterator[common_pb2.ImageUpload],
) -> AsyncIterator[common_pb2.ImageUpload]:
    for m in messages:
        yield m


async def import_image(agent: Agent, name: str, files: list[Path]) -> list[common_pb2.ImageInfo]:
    response = await agent.stub.ImportImage(stream(upload(agent.provider, name, files)))
    return list(response.images)


async def names(agent: Agent) -> set[str]:
    listed = await agent.stub.ListImages(
        nodeagent_pb2.AgentListImagesRequest(provider=agent.provider)
    )
    assert all(i.provider == agent.provider for i in listed.images)
    return {i.name for i in listed.images}


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def _docker(tmp: Path, tag: str) -> tuple[list[Path], Callable[[], object]]:
    tar = tmp / "busybox.tar"
    run("docker", "save", "-o", str(tar), TEST_IMAGE)
    return [tar], lambda: subprocess.run(["docker", "rmi", tag], capture_output=True, check=False)


def _lxd(tmp: Path, alias: str) -> tuple[list[Path], Callable[[], object]]:
    run("lxc", "image", "export", LXD_TEST_IMAGE, str(tmp / "busybox"))
    files = sorted(p for p in tmp.iterdir() if p.name.startswith("busybox"))
    return files, lambda: subprocess.run(
        ["lxc", "image", "alias", "delete", alias], capture_output=True, check=False
    )


def _qemu(tmp: Path, name: str) -> tuple[list[Path], Callable[[], object]]:
    return [DEFAULT_IMAGE_DIR / "debian-12" / f for f in IMAGE_FILES], lambda: subprocess.run(
        ["rm", "-rf", str(DEFAULT_IMAGE_DIR / name)], check=False
    )


EXPORTS = {"docker": _docker, "lxd": _lxd, "qemu": _qemu}


def _new_name(provider: str) -> str:
    suffix = uuid.uuid4().hex[:8]
    return f"vendetta/imported-{suffix}:1" if provider == "docker" else f"imported-{suffix}"


@pytest.fixture(params=[pytest.param(c, marks=c.marks, id=c.name) for c in CASES])
async def agent(request: pytest.FixtureRequest) -> AsyncIterator[Agent]:
    async with running_agent(request.param) as a:
        yield a


async def test_an_exported_image_imported_under_a_new_name_makes_environments(
    agent: Agent, tmp_path: Path
) -> None:
    name = _new_name(agent.provider)
    files, remove = await asyncio.to_thread(EXPORTS[agent.provider], tmp_path, name)
    try:
        assert name not in await names(agent)
        imported = await import_image(agent, name if agent.provider != "docker" else "", files)
        if agent.provider == "docker":  # the archive names its image; --name tags it too
            assert TEST_IMAGE in {i.name for i in imported}
            imported = await import_image(agent, name, files)
        assert [i.name for i in imported] == [name]
        assert imported[0].size_bytes > 0 and imported[0].created_unix_nano > 0
        assert name in await names(agent)
        ws = agent.ws()
        spec = nodeagent_pb2.EnvironmentSpec(workspace=ws, provider=agent.provider, image=name)
        env = await agent.stub.CreateEnvironment(nodeagent_pb2.CreateEnvironmentRequest(spec=spec))
        assert env.state in (
            common_pb2.ENVIRONMENT_STATE_CREATED,
            common_pb2.ENVIRONMENT_STATE_STOPPED,
        )
        await agent.stub.DestroyEnvironment(agent.ref(ws))
        if agent.provider != "docker":  # a name taken is refused, not replaced
            with pytest.raises(grpc.aio.AioRpcError) as taken:
                await import_image(agent, name, files)
            assert taken.value.code() == grpc.StatusCode.ALREADY_EXISTS
    finally:
        await asyncio.to_thread(remove)
    assert name not in await names(agent)


async def test_a_file_the_engine_does_not_take_is_refused_and_nothing_imported(
    agent: Agent, tmp_path: Path
) -> None:
    name = _new_name(agent.provider)
    bad = tmp_path / "rootfs.qcow2"
    bad.write_bytes(b"not an image\n" * 100)
    files = [bad]
    if agent.provider == "qemu":  # the right names, but the disk is not a qcow2
        files = [DEFAULT_IMAGE_DIR / "debian-12" / f for f in IMAGE_FILES[:2]] + [bad]
    before = await names(agent)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await import_image(agent, name, files)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
    assert "rootfs.qcow2" in (refused.value.details() or "")
    assert await names(agent) == before
    # An upload that ends before the bytes it announced imports nothing either.
    good, _ = await asyncio.to_thread(EXPORTS["qemu"], tmp_path, name)
    messages = list(upload(agent.provider, name, good if agent.provider == "qemu" else files))
    with pytest.raises(grpc.aio.AioRpcError) as short:
        await agent.stub.ImportImage(stream(iter(messages[:-1])))
    assert short.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "nothing was imported" in (short.value.details() or "")
    assert await names(agent) == before
    assert not list((agent.agent_dir / "imports").iterdir())
