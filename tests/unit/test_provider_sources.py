"""The engine-free parts of putting a workspace's source inside: the spec's checks,
LXD's id mapping and exec defaults, and how a QEMU guest runs commands as the user."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from common.errors import FailedPreconditionError, InvalidArgumentError
from providers.base import EnvironmentSpec
from providers.checks import check_spec
from providers.docker.provider import work_user
from providers.lxd import source as lxd_source
from providers.qemu.domain import Meta, guest_argv
from providers.qemu.source import owner


def test_spec_source_checks(tmp_path: Path) -> None:
    spec = EnvironmentSpec(workspace="ws", image="img", source_path=str(tmp_path))
    check_spec("docker", spec)
    assert spec.source_workdir == "/workspace"
    assert EnvironmentSpec(workspace="ws", image="img", workdir="/w").source_workdir == ""
    for kw, words in (
        ({"source_path": str(tmp_path / "absent")}, "not a folder on this node"),
        ({"source_path": "rel"}, "not a folder"),
        ({"workdir": "rel"}, "absolute folder"),
        ({"workdir": "/"}, "absolute folder"),
        ({"workdir": "/x/../y"}, "absolute folder"),
        ({"user": "a b"}, "not a user name"),
        ({"user": "a:b:c"}, "not a user name"),
    ):
        bad = EnvironmentSpec(workspace="ws", image="img", **kw)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError, match=words):
            check_spec("docker", bad)
    for user in ("dev", "1000", "1000:1000", "dev:staff"):
        check_spec("docker", EnvironmentSpec(workspace="ws", image="img", user=user))


def test_spec_git_dir_checks(tmp_path: Path) -> None:
    src, git_dir = tmp_path / "wt", tmp_path / "repo" / ".git"
    src.mkdir()
    git_dir.mkdir(parents=True)
    good = EnvironmentSpec(workspace="ws", image="img", source_path=str(src), git_dir=str(git_dir))
    check_spec("docker", good)
    assert lxd_source.create_fields(good)[1][lxd_source.GIT_DEVICE] == {
        "type": "disk",
        "source": str(git_dir),
        "path": str(git_dir),
    }
    for kw in (
        {"git_dir": str(git_dir)},  # no source
        {"source_path": str(src), "git_dir": "rel/.git"},
        {"source_path": str(src), "git_dir": str(tmp_path / "absent")},
        {"source_path": str(src), "git_dir": "/"},
        {"source_path": str(src), "git_dir": "/workspace"},
        {"source_path": str(src), "git_dir": "/workspace/.git"},
        {"source_path": str(src), "git_dir": str(git_dir), "workdir": f"{git_dir}/in"},
    ):
        bad = EnvironmentSpec(workspace="ws", image="img", **kw)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError, match="git directory"):
            check_spec("docker", bad)


def test_docker_has_the_folder_owner_work_in_place_of_root() -> None:
    assert work_user("", 1001, 1002) == "1001:1002"
    assert work_user("root", 1001, 1002) == "1001:1002"
    assert work_user("0:0", 1001, 1002) == "1001:1002"
    assert work_user("", 0, 0) == ""  # a root node user: the image's root
    assert work_user("vscode", 1001, 1002) == ""  # an image's own user stays


def test_lxd_exec_defaults_come_from_the_instance_config() -> None:
    assert lxd_source.inside_of({}).exec_fields(None, {}) == {}
    assert lxd_source.inside_of({}).exec_fields("/tmp", {}) == {"cwd": "/tmp"}
    config = {lxd_source.KEY_WORKDIR: "/workspace"} | lxd_source.user_fields(
        (1001, 1001), (1000, 100, "/home/dev")
    )
    assert config["raw.idmap"] == "uid 1001 1000\ngid 1001 100"
    inside = lxd_source.inside_of(config)
    assert inside.exec_fields(None, {"A": "1"}) == {
        "cwd": "/workspace",
        "user": 1000,
        "group": 100,
        "environment": {"HOME": "/home/dev", "A": "1"},
    }
    # The caller's folder and HOME win.
    assert inside.exec_fields("/", {"HOME": "/h"}) == {"cwd": "/", "user": 1000, "group": 100}
    # Root inside: nothing to say about the user (LXD's default), no mapping without a source.
    assert lxd_source.user_fields(None, (0, 0, "")) == {lxd_source.KEY_USER: ""}


def test_lxd_says_which_id_maps_are_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    subuid, subgid = tmp_path / "subuid", tmp_path / "subgid"
    subuid.write_text("root:100000:65536\nroot:1000:64536\nvdnode:200000:65536\n")
    subgid.write_text("root:100000:65536\n")
    monkeypatch.setattr(lxd_source, "SUBUID", subuid)
    monkeypatch.setattr(lxd_source, "SUBGID", subgid)
    lxd_source.check_mappable(1001, 100500)
    with pytest.raises(FailedPreconditionError) as info:
        lxd_source.check_mappable(1001, 1001)
    assert f"`root:1001:1` to {subgid}" in info.value.message
    assert str(subuid) not in info.value.message


def test_qemu_meta_keeps_the_source() -> None:
    meta = Meta(
        agent="a",
        workspace="ws",
        image="debian-12",
        state_dir="/s",
        source_path="/src",
        workdir="/workspace",
        user="dev",
    )
    assert Meta.from_xml(meta.to_xml()) == meta
    assert Meta.from_xml(Meta(agent="a", workspace="ws", image="i", state_dir="/s").to_xml()) == (
        Meta(agent="a", workspace="ws", image="i", state_dir="/s")
    )
    assert (owner(""), owner("root"), owner("dev"), owner("1000"), owner("1:2")) == (
        "",
        "",
        "dev:",
        "1000:1000",
        "1:2",
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
@pytest.mark.parametrize(
    ("user", "su"),
    [("nobody", "util-linux"), ("nobody", "busybox"), ("65534:65534", "util-linux")],
)
def test_qemu_guest_argv_runs_as_the_user_in_the_workdir(
    tmp_path: Path, user: str, su: str
) -> None:
    """The guest's command line, run here: su (busybox's or util-linux's) or setpriv."""
    argv = guest_argv(["sh", "-c", 'id -u; pwd; printf "[%s]" "$@"', "x", "-u", "a b"], "/", user)
    if su == "busybox":
        busybox = shutil.which("busybox")
        if busybox is None:
            pytest.skip("no busybox here")
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "su").symlink_to(busybox)
        env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    else:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False, timeout=30)
    assert done.stdout == "65534\n/\n[-u][a b]", done.stderr
    assert guest_argv(["id"], "", "root") == ["id"]
