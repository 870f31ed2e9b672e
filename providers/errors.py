"""The shape of every engine's error seam: SDK errors in, ``common.errors`` out."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from common.errors import VendettaError


@contextlib.contextmanager
def translated(
    mapped: tuple[type[BaseException], ...], translate: Callable[[BaseException], VendettaError]
) -> Iterator[None]:
    """Re-raise the SDK errors ``mapped`` from the block as ``translate`` makes them,
    chained; our own errors pass as they are."""
    try:
        yield
    except VendettaError:
        raise
    except mapped as exc:
        raise translate(exc) from exc
