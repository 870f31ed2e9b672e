"""What QEMU tests share: a provider of their own (a scratch state folder, its guests
destroyed after) and a domain's XML as the provider writes it."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import uuid
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from pathlib import Path

from providers.qemu import QemuProvider
from providers.qemu.domain import Files, Meta, domain_xml


@contextlib.asynccontextmanager
async def scratch_provider(prefix: str) -> AsyncIterator[QemuProvider]:
    state_dir = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    state_dir.chmod(0o755)  # QEMU runs as its own user and must reach the files
    p = QemuProvider(f"test-{uuid.uuid4().hex}", state_dir=state_dir)
    try:
        yield p
    finally:
        for env in await p.list():
            await p.destroy(env.workspace)
        await p.close()
        shutil.rmtree(state_dir, ignore_errors=True)


def domain_text(files: Files, ports: tuple[int, ...] = ()) -> str:
    meta = Meta(agent="a1", workspace="ws", image="debian-12", state_dir="/s", ports=ports)
    return domain_xml(
        name="vd-ws-a1",
        virt_type="qemu",
        vcpus=1,
        memory_kib=262144,
        kernel=Path("/img/vmlinuz"),
        initrd=Path("/img/initrd.img"),
        files=files,
        meta=meta,
    )


def domain_root(files: Files) -> ET.Element:
    return ET.fromstring(domain_text(files))
