"""What the agent's user lacks to use an engine, and how to give it: one sentence.

The agent runs as the node's SSH user. Each engine is reached through a file
that only root and one group may open (Docker's and LXD's sockets, libvirt's
socket, ``/dev/kvm``). When opening it fails with "permission denied", the
message names the file, the group that may open it, the user, and the command
that fixes it, e.g.::

    permission denied on /var/run/docker.sock (root:docker, mode 0660): add dev to
    the docker group (`sudo usermod -aG docker dev`) and log in again

A user added to the group after the agent started is told to restart the agent
(group membership is read at login). Blocking, but only reads ``/etc/group``
and ``stat``s one file.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from urllib.parse import urlparse


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _group_name(gid: int) -> str | None:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None


def socket_path(where: str) -> str | None:
    """The unix socket's path in an engine address (``unix:///var/run/docker.sock``,
    ``unix://var/run/docker.sock`` or a bare path); None for TCP and the like."""
    if where.startswith("/"):
        return where
    parsed = urlparse(where)
    if parsed.scheme not in ("unix", "http+unix"):
        return None
    path = parsed.netloc + parsed.path
    return path if path.startswith("/") else f"/{path}"


def permission_hint(path: str, group: str, *, user: str | None = None) -> str:
    """Why the agent's user may not open ``path`` and what to run: ``group`` is the
    engine's usual group, used when the file's own group says nothing better."""
    user = user or _user()
    owner_group = group
    described = path
    try:
        st = os.stat(path)
    except OSError:
        pass
    else:
        file_group = _group_name(st.st_gid)
        # A file of group root (0600/0660) is reached through no group: name the usual one.
        if file_group and file_group != "root" and st.st_mode & stat.S_IRWXG:
            owner_group = file_group
        owner = _owner_name(st.st_uid)
        described = (
            f"{path} ({owner}:{file_group or st.st_gid}, mode {stat.S_IMODE(st.st_mode):04o})"
        )
    try:
        members = grp.getgrnam(owner_group).gr_mem
        gid: int | None = grp.getgrnam(owner_group).gr_gid
    except KeyError:
        members, gid = [], None
    if gid is not None and (user in members or _primary_gid(user) == gid):
        return (
            f"permission denied on {described}: {user} is in the {owner_group} group, but this "
            "agent started before that: log in again and restart the agent "
            "(`vendetta-agent stop`; the coordinator starts it again)"
        )
    if gid is None:
        return (
            f"permission denied on {described}: there is no {owner_group} group on this node: "
            f"create it (`sudo groupadd --system {owner_group}`), give it the file, add {user} "
            f"to it (`sudo usermod -aG {owner_group} {user}`) and log in again, "
            "or run the agent as root"
        )
    return f"permission denied on {described}: {group_fix(owner_group, user)}"


def group_fix(group: str, user: str | None = None) -> str:
    """How ``user`` (the agent's) gets the rights of ``group``."""
    user = user or _user()
    return (
        f"add {user} to the {group} group (`sudo usermod -aG {group} {user}`) and log in "
        "again, or run the agent as root"
    )


def _owner_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _primary_gid(user: str) -> int | None:
    try:
        return pwd.getpwnam(user).pw_gid
    except KeyError:
        return None


def unreachable_by_others(path: str) -> str | None:
    """The first folder on the way to ``path`` (itself included) that other users may
    not pass through (no o+x), or None. QEMU runs as its own user under
    ``qemu:///system`` and opens the guest's disk by its path."""
    current = os.path.abspath(path)
    folders = []
    while True:
        folders.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    for folder in reversed(folders):
        try:
            mode = os.stat(folder).st_mode
        except OSError:
            return None  # not made yet: it is made 0755 below a reachable folder
        if not mode & stat.S_IXOTH:
            return folder
    return None


def socket_denied(where: str, group: str) -> str | None:
    """Why the agent's user may not use the engine's unix socket in ``where``, with the
    fix; None when it may, or when there is no such socket (not running is another
    check's answer)."""
    path = socket_path(where)
    if path is None or not os.path.exists(path):
        return None
    if os.access(path, os.R_OK | os.W_OK):
        return None
    return permission_hint(path, group)
