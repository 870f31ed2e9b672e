"""`vendetta image list|import`: the images on a node's engines, and giving a node
one from files on this machine (for nodes that reach no registry)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, BinaryIO

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from cli import checks
from cli.client import coordinator
from cli.output import ago, as_dict, err, out, print_json
from cli.runner import fail, run
from common.errors import InvalidArgumentError
from vendetta.v1 import common_pb2
from vendetta.v1 import coordinator_pb2 as pb

app = typer.Typer(
    help="Images on nodes: list them, or import one from files on this machine.",
    no_args_is_help=True,
)

Json = Annotated[bool, typer.Option("--json", help="Print JSON.")]

# Under gRPC's 4 MiB message limit, with room to spare.
CHUNK = 1024 * 1024

_IMPORT_HELP = """\
Import an image on NODE from files on this machine, with a progress bar.

What each provider takes:

docker: one `docker save` archive (a tar, optionally compressed); its images keep
their tags, and --name tags its one image too.

lxd: what `lxc image export` writes: a metadata tarball (metadata.yaml) and a root
filesystem (squashfs, tarball or qcow2), or one unified tarball; --name is the alias
(required).

qemu: a guest image's folder, or its three files by these names: vmlinuz, initrd.img
and rootfs.qcow2 (a qcow2 without a backing file); --name is the image's name on the
node (required).

A FILE that is a folder stands for the files in it (hidden ones left out). A file
that is not what the provider takes is refused, and nothing is imported.
"""
# Paragraphs as typer's rich help wraps them: one line each.
IMPORT_HELP = "\n\n".join(" ".join(p.split()) for p in _IMPORT_HELP.split("\n\n"))


def human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def _table(images: list[common_pb2.ImageInfo]) -> Table:
    table = Table("PROVIDER", "NAME", "SIZE", "CREATED", "ID")
    for i in images:
        table.add_row(
            i.provider,
            i.name,
            human(i.size_bytes) if i.size_bytes else "-",
            ago(i.created_unix_nano),
            i.id.removeprefix("sha256:")[:12] or "-",
        )
    return table


@app.command("list")
def list_(
    node: Annotated[str, typer.Argument(help="The node.", callback=checks.node_name)],
    provider: Annotated[
        str,
        typer.Option(
            help="Only this provider's images (default: every ready one).",
            callback=checks.provider,
        ),
    ] = "",
    json_: Json = False,
) -> None:
    """The images on NODE that workspaces can use (set one as PROVIDER.image in
    .vendetta/config.yaml)."""

    async def go() -> common_pb2.ListImagesResponse:
        async with coordinator() as c:
            return await c.ListImages(pb.ListImagesRequest(node=node, provider=provider))

    resp = run(go())
    if json_:
        print_json([as_dict(i) for i in resp.images])
        return
    if not resp.images:
        err.print(f"No images on {node}" + (f" for {provider}." if provider else "."))
        return
    out.print(_table(list(resp.images)))


def _expand(files: list[Path]) -> list[Path]:
    """The files to send: a folder stands for the plain files in it."""
    found: list[Path] = []
    for f in files:
        if f.is_dir():
            found.extend(
                sorted(p for p in f.iterdir() if p.is_file() and not p.name.startswith("."))
            )
        elif f.is_file():
            found.append(f)
        elif f.exists():  # /dev/zero, a FIFO: endless or blocking, never an image
            fail(InvalidArgumentError(f"{f}: not a regular file or a folder"))
        else:
            fail(InvalidArgumentError(f"{f}: no such file"))
    if not found:
        fail(InvalidArgumentError("no files to import"))
    names = [f.name for f in found]
    if len(set(names)) != len(names):
        fail(InvalidArgumentError(f"two files share a name: {', '.join(names)}"))
    return found


async def _upload(
    start: common_pb2.ImageUploadStart,
    files: list[Path],
    progress: Progress,
    task: TaskID,
) -> AsyncIterator[common_pb2.ImageUpload]:
    yield common_pb2.ImageUpload(start=start)
    for f in files:
        data: BinaryIO = await asyncio.to_thread(f.open, "rb")
        try:
            while block := await asyncio.to_thread(data.read, CHUNK):
                yield common_pb2.ImageUpload(chunk=block)
                progress.advance(task, len(block))
        finally:
            data.close()
    progress.update(task, description=f"sent to {start.node}, importing")


@app.command("import", help=IMPORT_HELP)
def import_(
    node: Annotated[
        str, typer.Argument(help="The node to import the image on.", callback=checks.node_name)
    ],
    files: Annotated[list[Path], typer.Argument(help="The image's files (or its folder).")],
    provider: Annotated[
        str,
        typer.Option(
            help="The provider whose engine takes the image: docker, lxd or qemu.",
            callback=checks.provider,
        ),
    ],
    name: Annotated[
        str,
        typer.Option(help="The image's name on the node (LXD alias, QEMU image; a Docker tag)."),
    ] = "",
    json_: Json = False,
) -> None:
    paths = _expand(files)
    sizes = [p.stat().st_size for p in paths]
    start = common_pb2.ImageUploadStart(
        node=node,
        provider=provider,
        name=name,
        files=[
            common_pb2.ImageFile(name=p.name, size_bytes=s)
            for p, s in zip(paths, sizes, strict=True)
        ],
    )
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
    )

    async def go() -> common_pb2.ImportImageResponse:
        async with coordinator() as c:
            with progress:
                task = progress.add_task(f"sending to {node}", total=sum(sizes))
                return await c.ImportImage(_upload(start, paths, progress, task))

    resp = run(go())
    if json_:
        print_json([as_dict(i) for i in resp.images])
        return
    err.print(
        f"Imported on {node} ({provider}): "
        + ", ".join(i.name for i in resp.images)
        + f". Use it with {provider}.image in .vendetta/config.yaml."
    )
    out.print(_table(list(resp.images)))
