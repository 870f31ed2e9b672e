"""Nodes that log in as a user who is not root (made by scripts/test-users.sh).

    MEMBER     in the docker, lxd, libvirt and kvm groups: every engine works
    OUTSIDER   in none: every engine must say what is missing

The agent runs from this checkout's venv, as that user. Where the venv's
interpreter lives somewhere the user may not enter (a Python built under
/root, on a developer's machine), :func:`agent_python` gives it a venv of the
system's Python that reads the same site-packages (same minor version).
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

MEMBER = "vdnode"
OUTSIDER = "vdoutsider"
MEMBER_GROUPS = frozenset({"docker", "lxd", "libvirt", "kvm"})
SYSTEM_PYTHON = Path("/usr/bin/python3")


def users_problem() -> str:
    """Why the test users are not as scripts/test-users.sh makes them ("" if they are)."""
    for user in (MEMBER, OUTSIDER):
        try:
            pwd.getpwnam(user)
        except KeyError:
            return f"user {user} missing (bash scripts/test-users.sh)"
    groups = {g.gr_name for g in grp.getgrall() if MEMBER in g.gr_mem}
    if not groups >= MEMBER_GROUPS:
        return f"{MEMBER} lacks {sorted(MEMBER_GROUPS - groups)} (bash scripts/test-users.sh)"
    if outsider := {g.gr_name for g in grp.getgrall() if OUTSIDER in g.gr_mem} & MEMBER_GROUPS:
        return f"{OUTSIDER} is in {sorted(outsider)} (bash scripts/test-users.sh)"
    return ""


def home(user: str) -> Path:
    return Path(pwd.getpwnam(user).pw_dir)


def as_user(user: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as ``user`` (from root), in its home."""
    return subprocess.run(
        ["runuser", "-u", user, "--", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=home(user),
        stdin=subprocess.DEVNULL,
    )


def open_dir(prefix: str) -> Path:
    """A fresh folder under /tmp that every user may enter (for sshd's authorized_keys)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


def agent_python(user: str, scratch: Path) -> str:
    """An interpreter ``user`` can run that imports this checkout's agent."""
    if as_user(user, sys.executable, "-c", "import nodeagent.main").returncode == 0:
        return sys.executable
    site_packages = sysconfig.get_paths()["purelib"]
    shim = scratch / "agent-venv"
    if not (shim / "bin" / "python").exists():
        subprocess.run(
            [str(SYSTEM_PYTHON), "-m", "venv", "--without-pip", str(shim)],
            check=True,
            capture_output=True,
        )
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        pth = shim / "lib" / version / "site-packages" / "vendetta-checkout.pth"
        pth.write_text(f"import site; site.addsitedir({site_packages!r})\n")
    python = str(shim / "bin" / "python")
    check = as_user(user, python, "-c", "import nodeagent.main, libvirt")
    if check.returncode != 0:
        raise RuntimeError(f"{user} cannot run the agent from {python}: {check.stderr}")
    return python


def remove_as_root(*paths: Path) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def owner_of(pid: int) -> str:
    return pwd.getpwuid(os.stat(f"/proc/{pid}").st_uid).pw_name
