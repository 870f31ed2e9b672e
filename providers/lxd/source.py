"""The workspace's source in an LXD container: a disk device of the node's folder at
the workdir, and one id mapped so that its files belong to the user inside.

An unprivileged container sees host ids shifted (root inside is host 100000 or
so): the node user's files would show as nobody (65534), and files made inside
as a shifted uid on the node. ``shift=true`` on the device needs idmapped
mounts of LXD, which LXD 5.0 here refuses ("Required idmapping abilities not
available"); so the container gets ``raw.idmap`` mapping the folder owner's
uid/gid on the node to the uid/gid of the user inside. Files are then theirs
inside, and what they write is the node user's on the node. LXD maps ids with
``newuidmap``, which allows root only the host ids /etc/subuid and /etc/subgid
give it (``root:UID:1``): ``scripts/engine-lxd.sh`` adds them for LXD's users,
and a missing one is reported with the line to add.

Commands start in the workdir, as the user inside: the instance's config keys
remember both, and every exec, terminal and recorded run is given them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import FailedPreconditionError, InvalidArgumentError
from providers.base import SOURCE_MOUNTED, EnvironmentSpec

KEY_WORKDIR = "user.vendetta.workdir"
KEY_SOURCE_MODE = "user.vendetta.source_mode"
# "UID:GID:HOME" of the user commands run as ("" : root, LXD's default).
KEY_USER = "user.vendetta.user"
DEVICE = "vendetta-source"
GIT_DEVICE = "vendetta-source-git"

SUBUID = Path("/etc/subuid")
SUBGID = Path("/etc/subgid")


@dataclass(frozen=True)
class Inside:
    """Where commands start and as whom, as the instance's config keys say."""

    cwd: str = ""
    uid: int | None = None
    gid: int | None = None
    home: str = ""

    def exec_fields(self, cwd: str | None, env: Mapping[str, str]) -> dict[str, Any]:
        """What an exec request body gets: cwd (the caller's, else the workdir), user,
        group, and HOME for a user other than root (unless the caller set one)."""
        fields: dict[str, Any] = {}
        if cwd or self.cwd:
            fields["cwd"] = cwd or self.cwd
        if self.uid is not None:
            fields["user"] = self.uid
            fields["group"] = self.gid if self.gid is not None else self.uid
        if self.home and "HOME" not in env:
            fields["environment"] = {"HOME": self.home, **env}
        return fields


def inside_of(config: Mapping[str, Any]) -> Inside:
    uid = gid = None
    home = ""
    if user := str(config.get(KEY_USER) or ""):
        u, g, home = [*user.split(":", 2), "", ""][:3]
        uid, gid = int(u), int(g)
    return Inside(cwd=str(config.get(KEY_WORKDIR) or ""), uid=uid, gid=gid, home=home)


def owner(source_path: str) -> tuple[int, int]:
    """The uid and gid owning the source folder on the node. Blocking."""
    info = os.stat(source_path)
    return info.st_uid, info.st_gid


def _delegated(path: Path, host_id: int) -> bool:
    """Whether ``path`` (subuid/subgid) lets root map ``host_id``."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[0] in ("root", "0"):
            try:
                start, count = int(parts[1]), int(parts[2])
            except ValueError:
                continue
            if start <= host_id < start + count:
                return True
    return False


def check_mappable(uid: int, gid: int) -> None:
    """LXD may map the node user's ids into a container. Blocking."""
    missing = [
        f"`root:{host_id}:1` to {path}"
        for path, host_id in ((SUBUID, uid), (SUBGID, gid))
        if not _delegated(path, host_id)
    ]
    if missing:
        raise FailedPreconditionError(
            f"LXD cannot give the workspace's files to the user inside: the source belongs "
            f"to uid {uid} gid {gid} on this node, which root may not map into containers; "
            f"add {' and '.join(missing)} as root (scripts/engine-lxd.sh does), then create "
            "the workspace again"
        )


def create_fields(spec: EnvironmentSpec) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """Config keys and devices a new instance gets for its source (none without one)."""
    workdir = spec.source_workdir
    if not workdir:
        return {}, {}
    config = {KEY_WORKDIR: workdir, KEY_SOURCE_MODE: SOURCE_MOUNTED}
    devices = {DEVICE: {"type": "disk", "source": spec.source_path, "path": workdir}}
    if spec.git_dir:  # the worktree's repository, where its .git file points; same raw.idmap
        devices[GIT_DEVICE] = {"type": "disk", "source": spec.git_dir, "path": spec.git_dir}
    return config, devices


def _read(client: Any, instance: str, path: str) -> str:
    response = client.api.instances[instance].files.get(params={"path": path})
    return str(response.content.decode(errors="replace"))


def _lookup(text: str, name: str) -> list[str] | None:
    for line in text.splitlines():
        fields = line.split(":")
        if fields and fields[0] == name:
            return fields
    return None


def resolve_user(client: Any, instance: str, user: str) -> tuple[int, int, str]:
    """uid, gid and home inside of ``user`` (name, uid, uid:gid; "": root). Blocking:
    a name is looked up in the (stopped) instance's /etc/passwd and /etc/group."""
    if not user:
        return 0, 0, ""
    name, _, group = user.partition(":")
    home = ""
    if name.isdigit():
        uid, gid = int(name), int(name)
    else:
        entry = _lookup(_read(client, instance, "/etc/passwd"), name)
        if entry is None or len(entry) < 6:
            raise InvalidArgumentError(
                f"user {name!r} is not in the image's /etc/passwd: set `user:` in "
                ".vendetta/config.yaml to a user of the image, a uid, or uid:gid"
            )
        uid, gid, home = int(entry[2]), int(entry[3]), entry[5]
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            found = _lookup(_read(client, instance, "/etc/group"), group)
            if found is None or len(found) < 3:
                raise InvalidArgumentError(
                    f"group {group!r} is not in the image's /etc/group: fix `user:` in "
                    ".vendetta/config.yaml"
                )
            gid = int(found[2])
    return uid, gid, home


def user_fields(host: tuple[int, int] | None, inside: tuple[int, int, str]) -> dict[str, str]:
    """The config remembering the user inside, and with a source (``host``: its owner's
    uid and gid on the node) mapping that owner to the user inside."""
    uid, gid, home = inside
    fields = {KEY_USER: f"{uid}:{gid}:{home}" if (uid, gid) != (0, 0) else ""}
    if host is not None:
        fields["raw.idmap"] = f"uid {host[0]} {uid}\ngid {host[1]} {gid}"
    return fields
