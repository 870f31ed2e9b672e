"""`vendetta image import|list` end to end: files on this machine sent through a real
coordinator to a node behind a real sshd, loaded into the real Docker engine."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import TEST_IMAGE
from tests.support.cli import Env, cli_env
from tests.support.sshd import SshServer

pytestmark = [pytest.mark.e2e, pytest.mark.docker, pytest.mark.sshd]


@pytest.fixture(scope="module")
def e2e() -> Iterator[Env]:
    with cli_env("vd-e2e-img-") as e:
        e.nodes["img1"] = SshServer.start(e.home / "sshd1", host="127.0.0.2")
        e.cli("server", "start")
        e.add_node("img1", e.nodes["img1"])
        yield e


def test_image_import_sends_a_docker_save_archive_with_progress(e2e: Env, tmp_path: Path) -> None:
    tar = tmp_path / "busybox.tar"
    subprocess.run(["docker", "save", "-o", str(tar), TEST_IMAGE], check=True)
    tag = f"vendetta/e2e-imported-{uuid.uuid4().hex[:8]}:1"
    try:
        done = e2e.cli("image", "import", "img1", str(tar), "--provider", "docker", "--name", tag)
        assert "sent to img1, importing" in done.stderr, done.stderr
        size = tar.stat().st_size / 1e6
        assert f"{size:.1f}/{size:.1f} MB" in done.stderr, done.stderr  # every byte sent
        assert f"Imported on img1 (docker): {tag}" in done.stderr
        assert tag in done.stdout
        listed = e2e.json("image", "list", "img1", "--provider", "docker")
        (mine,) = [i for i in listed if i["name"] == tag]
        assert mine["provider"] == "docker" and int(mine["size_bytes"]) > 0
        assert tag in e2e.cli("image", "list", "img1").stdout
    finally:
        subprocess.run(["docker", "rmi", tag], capture_output=True, check=False)


def test_image_import_refuses_what_the_provider_does_not_take(e2e: Env, tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_text("not an archive\n" * 50)
    before = e2e.json("image", "list", "img1", "--provider", "docker")
    said = e2e.fails("image", "import", "img1", str(junk), "--provider", "docker")
    assert "junk.tar is not a `docker save` archive" in said, said
    assert e2e.json("image", "list", "img1", "--provider", "docker") == before
    said = e2e.fails("image", "import", "img1", str(junk), "--provider", "qemu")
    assert "needs a name" in said and "--name" in said, said
    said = e2e.fails("image", "import", "nosuchnode", str(junk), "--provider", "docker")
    assert "nosuchnode" in said, said
    said = e2e.fails("image", "import", "img1", str(tmp_path / "absent"), "--provider", "docker")
    assert "no such file" in said, said
