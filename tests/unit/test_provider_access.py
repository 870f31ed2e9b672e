"""What a node user lacks to use an engine, said with the fix (providers.access and its users)."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from providers.access import permission_hint, socket_path, unreachable_by_others
from providers.docker.errors import unreachable_message as docker_unreachable
from providers.lxd.errors import unreachable_message as lxd_unreachable
from providers.qemu.images import STATE_DIR_ENV, state_dir_problem
from providers.qemu.provider import DEFAULT_STATE_DIR, default_state_dir


def test_socket_paths_in_engine_addresses() -> None:
    assert socket_path("unix:///var/run/docker.sock") == "/var/run/docker.sock"
    assert socket_path("unix://var/run/docker.sock") == "/var/run/docker.sock"
    assert socket_path("/var/lib/lxd/unix.socket") == "/var/lib/lxd/unix.socket"
    assert socket_path("tcp://127.0.0.1:2375") is None
    assert socket_path("https://10.0.0.1:8443") is None


def _a_group_without(user: str) -> grp.struct_group:
    """A group of this machine that ``user`` is not in (by membership or primary gid)."""
    primary = pwd.getpwnam(user).pw_gid
    for group in grp.getgrall():
        if group.gr_gid not in (0, primary) and user not in group.gr_mem:
            return group
    pytest.skip("no group without the user on this machine")


def test_a_user_outside_the_group_is_told_to_join_it(tmp_path: Path) -> None:
    group = _a_group_without("nobody")
    sock = tmp_path / "engine.sock"
    sock.touch()
    os.chown(sock, 0, group.gr_gid)
    sock.chmod(0o660)
    hint = permission_hint(str(sock), "engine", user="nobody")
    assert hint == (
        f"permission denied on {sock} (root:{group.gr_name}, mode 0660): add nobody to the "
        f"{group.gr_name} group (`sudo usermod -aG {group.gr_name} nobody`) and log in again, "
        "or run the agent as root"
    )


def test_a_file_of_group_root_names_the_engines_usual_group(tmp_path: Path) -> None:
    group = _a_group_without("nobody")
    sock = tmp_path / "engine.sock"
    sock.touch()
    sock.chmod(0o600)
    hint = permission_hint(str(sock), group.gr_name, user="nobody")
    assert "(root:root, mode 0600)" in hint
    assert f"sudo usermod -aG {group.gr_name} nobody" in hint


def test_a_member_whose_agent_predates_the_group_is_told_to_restart_it(tmp_path: Path) -> None:
    primary = grp.getgrgid(pwd.getpwnam("nobody").pw_gid)
    sock = tmp_path / "engine.sock"
    sock.touch()
    os.chown(sock, 0, primary.gr_gid)
    sock.chmod(0o660)
    hint = permission_hint(str(sock), "engine", user="nobody")
    assert f"nobody is in the {primary.gr_name} group, but this agent started before" in hint
    assert "restart the agent" in hint


def test_a_missing_group_is_to_be_made() -> None:
    hint = permission_hint("/nonexistent/engine.sock", "vd-no-such-group", user="nobody")
    assert "there is no vd-no-such-group group on this node" in hint
    assert "sudo groupadd --system vd-no-such-group" in hint


def test_engine_messages_on_permission_denied_name_socket_group_and_fix() -> None:
    docker = docker_unreachable(
        "unix:///nonexistent/docker.sock",
        "('Connection aborted.', PermissionError(13, 'Permission denied'))",
    )
    assert docker.startswith("Docker daemon at unix:///nonexistent/docker.sock refused this user:")
    assert "permission denied on /nonexistent/docker.sock" in docker
    assert "sudo usermod -aG docker " in docker
    lxd = lxd_unreachable("unix:///nonexistent/unix.socket", "Permission denied")
    assert "permission denied on /nonexistent/unix.socket" in lxd
    assert "sudo usermod -aG lxd " in lxd
    # Any other failure still says how to start the daemon.
    assert "start it" in docker_unreachable("unix:///nonexistent/docker.sock", "No such file")


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A folder others may enter (pytest's own is root's only)."""
    path = Path(tempfile.mkdtemp(prefix="vd-access-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_folders_closed_to_others_are_found(open_tmp: Path) -> None:
    tmp_path = open_tmp
    closed = tmp_path / "home"
    (closed / "a" / "b").mkdir(parents=True)
    assert unreachable_by_others(str(closed / "a" / "b")) is None
    closed.chmod(0o700)
    assert unreachable_by_others(str(closed / "a" / "b")) == str(closed)
    # Not made yet below an open folder: it will be made open.
    closed.chmod(0o755)
    assert unreachable_by_others(str(closed / "a" / "b" / "c" / "d")) is None


def test_the_qemu_state_folder_is_made_open_and_a_closed_home_is_named(open_tmp: Path) -> None:
    tmp_path = open_tmp
    old_umask = os.umask(0o077)
    try:
        state = tmp_path / "home" / ".local" / "share" / "vendetta" / "qemu"
        assert state_dir_problem(state) is None
        assert all(
            (p.stat().st_mode & 0o777) == 0o755
            for p in (state, *state.parents)
            if tmp_path in p.parents
        )
        (tmp_path / "home").chmod(0o700)
        problem = state_dir_problem(state)
        assert problem is not None
        assert f"{tmp_path / 'home'} is closed to other users" in problem
        assert f"chmod o+x {tmp_path / 'home'}" in problem and STATE_DIR_ENV in problem
    finally:
        os.umask(old_umask)


def test_the_qemu_state_folder_is_roots_or_the_users_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(STATE_DIR_ENV, raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_state_dir() == DEFAULT_STATE_DIR
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("HOME", "/home/dev")
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    assert default_state_dir() == Path("/home/dev/.local/share/vendetta/qemu")
    monkeypatch.setenv("XDG_DATA_HOME", "/data/dev")
    assert default_state_dir() == Path("/data/dev/vendetta/qemu")
    monkeypatch.setenv(STATE_DIR_ENV, "/srv/guests")
    assert default_state_dir() == Path("/srv/guests")
