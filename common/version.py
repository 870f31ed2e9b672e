"""The version users see, and a build id that changes with the code.

Agents are long-lived and outlive upgrades: ``ensure`` compares the running
agent's build with its own and replaces an agent from another build, so the
coordinator never talks to code that does not know its RPCs.
"""

from __future__ import annotations

import functools
import hashlib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    VERSION = version("vendetta")
except PackageNotFoundError:  # running from a source tree that was not installed
    VERSION = "0.0.0+src"

_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "coordinator", "nodeagent", "providers", "cli", "vendetta")


@functools.cache
def build_id() -> str:
    """VERSION plus a digest of the sources (cheap: about a hundred small files)."""
    return build_id_of(_ROOT)


def build_id_of(root: Path) -> str:
    """The build id of the sources under ``root`` (a checkout, a copy, a site-packages)."""
    digest = hashlib.sha256()
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    return f"{VERSION}+{digest.hexdigest()[:10]}"


def source_root() -> Path:
    """The folder that holds vendetta's packages (a checkout or site-packages)."""
    return _ROOT
