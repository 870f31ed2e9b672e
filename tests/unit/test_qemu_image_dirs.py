"""QEMU guest images in more than one folder: a non-root agent's own, then root's."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.errors import AlreadyExistsError, FailedPreconditionError, ImageNotFoundError
from providers.qemu.images import IMAGE_FILES, image_infos, image_paths, images, import_files
from providers.qemu.provider import DEFAULT_IMAGE_DIR, default_image_dirs


def _image(folder: Path, name: str) -> Path:
    (folder / name).mkdir(parents=True)
    for f in IMAGE_FILES:
        (folder / name / f).write_bytes(f"{name}/{f}".encode())
    return folder / name


def test_root_uses_the_system_folder_and_others_their_own_first(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 0)
    assert default_image_dirs() == (DEFAULT_IMAGE_DIR,)
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_image_dirs() == (tmp_path / "data" / "vendetta" / "images", DEFAULT_IMAGE_DIR)
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    own = tmp_path / "home" / ".local" / "share" / "vendetta" / "images"
    assert default_image_dirs() == (own, DEFAULT_IMAGE_DIR)


def test_both_folders_are_listed_and_the_first_holding_a_name_wins(tmp_path: Path) -> None:
    own, system = tmp_path / "own", tmp_path / "system"
    _image(own, "mine")
    _image(own, "shared")
    _image(system, "shared")
    _image(system, "debian-12")
    (system / "half").mkdir()  # incomplete: not an image
    (system / "half" / "vmlinuz").write_bytes(b"k")
    # An import written but not yet renamed (found by a parallel run: a node added
    # meanwhile failed on its name): not an image either.
    _image(system, ".import-shared2-x1y2")
    dirs = (own, system)
    assert images(dirs) == ["debian-12", "mine", "shared"]
    assert [i.name for i in image_infos(dirs)] == ["debian-12", "mine", "shared"]
    assert image_paths(dirs, "shared")[2] == own / "shared" / "rootfs.qcow2"
    assert image_paths(dirs, "debian-12")[0] == system / "debian-12" / "vmlinuz"
    assert images((tmp_path / "missing", system)) == ["debian-12", "shared"]

    with pytest.raises(ImageNotFoundError) as missing:
        image_paths(dirs, "nope")
    assert f"not in {own} or {system}" in missing.value.message
    assert "images on this node: debian-12, mine, shared" in missing.value.message
    with pytest.raises(ImageNotFoundError) as half:
        image_paths(dirs, "half")
    assert f"{system / 'half'} lacks initrd.img, rootfs.qcow2" in half.value.message


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A folder every user may pass through on the way to (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="vd-qemu-images-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def guest_files(tmp_path: Path) -> dict[str, Path]:
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img not installed (bash scripts/engine-qemu.sh)")
    src = tmp_path / "src"
    src.mkdir()
    (src / "vmlinuz").write_bytes(b"kernel")
    (src / "initrd.img").write_bytes(b"initrd")
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(src / "rootfs.qcow2"), "1M"], check=True
    )
    return {f: src / f for f in IMAGE_FILES}


def test_import_goes_to_the_first_folder_made_passable_for_qemu(
    open_tmp: Path, guest_files: dict[str, Path]
) -> None:
    system = open_tmp / "system"
    _image(system, "debian-12")
    own = open_tmp / "home" / "data" / "vendetta" / "images"
    import_files((own, system), "mine", guest_files)
    assert images((own, system)) == ["debian-12", "mine"]
    for folder in (own, *list(own.parents)[:3], own / "mine"):
        assert folder.stat().st_mode & 0o777 == 0o755, folder
    assert all((own / "mine" / f).stat().st_mode & 0o777 == 0o644 for f in IMAGE_FILES)

    with pytest.raises(AlreadyExistsError) as taken:  # a name of root's folder is taken too
        import_files((own, system), "debian-12", guest_files)
    assert str(system / "debian-12") in taken.value.message
    assert not (own / "debian-12").exists()


def test_import_into_a_folder_qemu_cannot_pass_says_which_and_the_fix(
    open_tmp: Path, guest_files: dict[str, Path]
) -> None:
    closed = open_tmp / "closed"
    closed.mkdir(mode=0o700)
    closed.chmod(0o700)
    own = closed / "vendetta" / "images"
    with pytest.raises(FailedPreconditionError) as refused:
        import_files((own,), "mine", guest_files)
    assert f"`chmod o+x {closed}`" in refused.value.message
    assert images((own,)) == []
