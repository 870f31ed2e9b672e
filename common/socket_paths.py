"""Unix socket paths that always fit, however long $HOME or a node's name.

``sockaddr_un.sun_path`` holds 107 bytes: ``~/.local/state/vendetta/tunnels/``
plus a valid 63-character node name overflows it once $HOME is longer than a
few characters. The local end of each node's tunnel therefore falls back to a
short name, and when even the folder is too long, to a private folder of this
user under $XDG_RUNTIME_DIR or /tmp.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
from pathlib import Path

from common.errors import InvalidArgumentError
from common.paths import MAX_SOCKET_PATH, check_socket_path, private_dir


def fits(path: Path) -> bool:
    return len(os.fsencode(str(path))) <= MAX_SOCKET_PATH


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _hashed(folder: Path, node: str) -> Path:
    # '_' is in no node name: a hashed name never meets a node's own NODE.sock.
    return folder / f"_{_digest(node)}.sock"


def tunnel_socket(tunnel_dir: Path, node: str) -> Path:
    """Where the coordinator listens for ``node``'s tunnel, in a 0700 folder of
    ours: ``TUNNELS/NODE.sock`` when it fits, else ``TUNNELS/_HASH.sock``, else
    ``_HASH.sock`` in a short private folder (one per TUNNELS folder)."""
    private_dir(tunnel_dir)
    for path in (tunnel_dir / f"{node}.sock", _hashed(tunnel_dir, node)):
        if fits(path):
            return path
    return check_socket_path(_hashed(short_private_dir(tunnel_dir), node))


def short_private_dir(for_dir: Path) -> Path:
    """A private folder with a short path standing in for ``for_dir``:
    ``$XDG_RUNTIME_DIR/vendetta-UID/HASH`` or ``/tmp/vendetta-UID/HASH``."""
    key = _digest(str(for_dir.absolute()))
    bases = [os.environ.get("XDG_RUNTIME_DIR") or "", tempfile.gettempdir(), "/tmp"]
    for base in filter(None, bases):
        root = Path(base) / f"vendetta-{os.getuid()}"
        folder = root / key
        if fits(_hashed(folder, "x")):
            owned_private_dir(root)
            return owned_private_dir(folder)
    raise InvalidArgumentError(
        f"no folder short enough for unix sockets (under {MAX_SOCKET_PATH} bytes): "
        "set TMPDIR to a short folder"
    )


def owned_private_dir(path: Path) -> Path:
    """``path`` as a 0700 folder of ours; refused if it is a link, not a folder or
    someone else's (in /tmp, anyone could have made it first)."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise InvalidArgumentError(
            f"{path} is not a folder of this user (a link, a file or someone else's): "
            "remove it, or set TMPDIR to a folder of yours"
        )
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path
