"""The workspace's source in a QEMU guest: copied in through the guest agent.

The guest shares no folder with the node (no virtio-9p or virtiofs share is set
up: a 9p share under qemu:///system gives the guest's files the QEMU process's
owner on the node, and virtiofs needs virtiofsd and shared memory), so the
node's folder is packed into a tar, written into the guest with the agent's
``guest-file-*`` commands, and extracted at the workdir, owned by the user
inside. That happens once, at the first start: a marker in the guest keeps a
later start (or restart) from overwriting what was changed inside since.
``inspect`` reports the source as "copied". Blocking: run in a thread.
"""

from __future__ import annotations

import base64
import contextlib
import os
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import libvirt

from common.errors import DeadlineExceededError, FailedPreconditionError
from providers.qemu import agent
from providers.qemu.domain import ROOT_USERS

MARKER = "/var/lib/vendetta/source-copied"
GUEST_TAR = "/var/lib/vendetta/source.tar"
# Raw bytes per guest-file-write (base64 in the agent's JSON message).
WRITE_SIZE = 512 * 1024
COMMAND_SECONDS = 600.0

# sh -c SCRIPT sh WORKDIR TAR OWNER MARKER: extract, give it to the user inside, mark done.
EXTRACT = """set -e
mkdir -p "$1"
tar -xf "$2" -C "$1" --no-same-owner --no-same-permissions
rm -f "$2"
if [ -n "$3" ]; then chown -R "$3" "$1"; fi
touch "$4"
"""


def run(dom: libvirt.virDomain, argv: list[str]) -> tuple[int, bytes, bytes]:
    """Run argv in the guest (as root) to its end: (exit code, stdout, stderr)."""
    pid = agent.exec_start(dom, argv, {}, capture=True)
    deadline = time.monotonic() + COMMAND_SECONDS
    delay = 0.02
    while True:
        exited, code, out, err = agent.exec_status(dom, pid)
        if exited:
            return code, out, err
        if time.monotonic() > deadline:
            raise DeadlineExceededError(
                f"{argv[0]} did not end in the guest within {COMMAND_SECONDS:.0f}s"
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


def owner(user: str) -> str:
    """chown's owner for ``user`` (name, uid, uid:gid, name:group): "" for root."""
    if user in ROOT_USERS:
        return ""
    if ":" in user:
        return user
    return f"{user}:{user}" if user.isdigit() else f"{user}:"


def _pack(folder: Path, out: Path) -> None:
    with tarfile.open(out, "w") as tar:
        for entry in sorted(folder.iterdir()):
            tar.add(entry, arcname=entry.name)


def _write(dom: libvirt.virDomain, local: Path, remote: str) -> None:
    handle = agent.command(dom, "guest-file-open", path=remote, mode="w")
    try:
        with local.open("rb") as f:
            while data := f.read(WRITE_SIZE):
                chunk: dict[str, Any] = {"buf-b64": base64.b64encode(data).decode()}
                agent.command(dom, "guest-file-write", handle=handle, **chunk)
    finally:
        agent.command(dom, "guest-file-close", handle=handle)


def copy_in(dom: libvirt.virDomain, folder: str, workdir: str, user: str, spool: Path) -> bool:
    """Copy ``folder`` (on the node) to ``workdir`` in the guest, owned by ``user``,
    unless that was done before; whether it copied now."""
    # Absent marker: the folder for it and for the tar made, in one command.
    code, _, _ = run(
        dom,
        [
            "/bin/sh",
            "-c",
            'test -e "$1" || { mkdir -p "$2"; exit 1; }',
            "sh",
            MARKER,
            os.path.dirname(GUEST_TAR),
        ],
    )
    if code == 0:
        return False
    if not os.path.isdir(folder):
        raise FailedPreconditionError(
            f"the workspace's source {folder} is not on this node any more: send it again "
            "(`vendetta workspace push`)"
        )
    spool.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".source-", suffix=".tar", dir=spool)
    os.close(fd)
    local = Path(name)
    try:
        _pack(Path(folder), local)
        _write(dom, local, GUEST_TAR)
    finally:
        with contextlib.suppress(OSError):
            local.unlink()
    code, _, err = run(
        dom, ["/bin/sh", "-c", EXTRACT, "sh", workdir, GUEST_TAR, owner(user), MARKER]
    )
    if code != 0:
        raise FailedPreconditionError(
            f"could not put the workspace's source at {workdir} in the guest (exit code "
            f"{code}): {err.decode(errors='replace').strip()}"
        )
    return True


# sh -c SCRIPT sh WORKDIR TAR OWNER REPLACE DELETED...: an upload over the copy.
APPLY = """set -e
w=$1 t=$2 o=$3 r=$4
shift 4
cd "$w"
if [ "$r" = 1 ]; then find . -mindepth 1 -maxdepth 1 -exec rm -rf -- {} +; fi
for p; do rm -rf -- "./$p"; done
if [ -s "$t" ]; then tar -xf "$t" --no-same-owner --no-same-permissions; fi
rm -f "$t"
if [ -n "$o" ]; then chown -R "$o" .; fi
"""


def copied(dom: libvirt.virDomain) -> bool:
    """Whether the guest holds its copy of the source (the first start made it)."""
    return run(dom, ["test", "-e", MARKER])[0] == 0


def apply_in(
    dom: libvirt.virDomain,
    tar: Path,
    workdir: str,
    user: str,
    replace: bool,
    deleted: list[str],
) -> None:
    """An upload the node's folder just took, over the guest's copy too."""
    _write(dom, tar, GUEST_TAR)
    flag = "1" if replace else "0"
    argv = ["/bin/sh", "-c", APPLY, "sh", workdir, GUEST_TAR, owner(user), flag, *deleted]
    code, _, err = run(dom, argv)
    if code != 0:
        raise FailedPreconditionError(
            f"could not bring the upload into the guest's {workdir} (exit code {code}): "
            f"{err.decode(errors='replace').strip()}"
        )


READ_SIZE = 1024 * 1024
GUEST_OUT = "/var/lib/vendetta/source-out.tar"


def copy_out(dom: libvirt.virDomain, workdir: str, dest: Path) -> None:
    """A tar of the guest's workdir, into ``dest`` on the node."""
    code, _, err = run(dom, ["tar", "-cf", GUEST_OUT, "-C", workdir, "."])
    if code != 0:
        raise FailedPreconditionError(
            f"could not pack the guest's {workdir} (exit code {code}): "
            f"{err.decode(errors='replace').strip()}"
        )
    try:
        handle = agent.command(dom, "guest-file-open", path=GUEST_OUT, mode="r")
        try:
            with dest.open("wb") as out:
                while True:
                    got = agent.command(dom, "guest-file-read", handle=handle, count=READ_SIZE)
                    out.write(base64.b64decode(got.get("buf-b64", "")))
                    if got.get("eof") or not got.get("count"):
                        break
        finally:
            agent.command(dom, "guest-file-close", handle=handle)
    finally:
        run(dom, ["rm", "-f", GUEST_OUT])
