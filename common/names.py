"""Names of nodes and workspaces: one rule, checked at every edge."""

from __future__ import annotations

import re

from common.display import shown
from common.errors import InvalidArgumentError

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def validate_name(kind: str, name: str) -> str:
    """Return ``name`` if it is a valid node/workspace/service name, else raise.

    The name is echoed escaped and cut short: it may hold terminal escapes, and a
    huge one would not fit in a gRPC status."""
    if not NAME_RE.fullmatch(name):
        raise InvalidArgumentError(
            f"invalid {kind} name '{shown(name, 100)}': use 1-63 characters, lowercase "
            "letters, digits and '-', starting with a letter or digit (e.g. 'my-project')"
        )
    return name
