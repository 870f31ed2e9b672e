"""asyncssh looks for liboqs (post-quantum key exchange) when it is imported, with
`ctypes.util.find_library("oqs")` and `("liboqs")`. Where the library is not in
the loader's cache, find_library goes on to run `gcc` and `ld` to look for it, and
gcc is on most developers' machines (and on ours: libvirt-python builds with it):
about 100 ms of every `ssh NAME.vendetta` connection's start went there, before
the proxy said a word (measured with strace, docs/performance.md).

`skip_absent_search` makes those two look-ups answer None at once where no
liboqs file is in the loader's directories (LD_LIBRARY_PATH, the system's and
their multiarch folders); where one is, find_library runs as before, so a
machine with liboqs keeps its key exchanges. Other names are left alone.
"""

from __future__ import annotations

import ctypes.util
import functools
import glob
import os
import sysconfig
from collections.abc import Callable

_NAMES = frozenset({"oqs", "liboqs"})
_BASES = ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib", "/usr/local/lib64")


def _dirs() -> list[str]:
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    extra = [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
    return extra + [p for base in _BASES for p in (base, os.path.join(base, multiarch))]


def present() -> bool:
    """Whether a liboqs shared library is in one of the loader's usual folders."""
    return any(glob.glob(os.path.join(d, "liboqs.so*")) for d in _dirs())


def skip_absent_search() -> None:
    """Wrap ctypes.util.find_library once, for the liboqs names only."""
    real: Callable[[str], str | None] = ctypes.util.find_library
    if getattr(real, "_vendetta_liboqs", False):
        return

    @functools.wraps(real)
    def find_library(name: str) -> str | None:
        if name in _NAMES and not present():
            return None
        return real(name)

    find_library._vendetta_liboqs = True  # type: ignore[attr-defined]
    ctypes.util.find_library = find_library
