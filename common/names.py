"""Names of nodes and workspaces: one rule, checked at every edge."""

from __future__ import annotations

import re

from common.errors import InvalidArgumentError

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def validate_name(kind: str, name: str) -> str:
    """Return ``name`` if it is a valid node/workspace/service name, else raise."""
    if not NAME_RE.fullmatch(name):
        raise InvalidArgumentError(
            f"invalid {kind} name {name!r}: use 1-63 characters, lowercase letters, digits "
            "and '-', starting with a letter or digit (e.g. 'my-project')"
        )
    return name
