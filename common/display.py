"""Showing what a user (or a file) supplied inside our messages, safely.

Names, paths and keys echoed back may hold terminal escapes, right-to-left
overrides or zero-width characters that would rewrite or hide the rest of the
line; they may also be megabytes long. ``shown`` escapes every character that
is not plainly printable and cuts the text to a length a message can carry.
"""

from __future__ import annotations


def neutral(text: str) -> str:
    """``text`` with control, format (bidi, zero-width) and separator characters
    escaped as Python writes them (``\\n``, ``\\x1b``, ``\\u202e``): what prints
    is what was there."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def shown(text: str, limit: int = 80) -> str:
    """``neutral(text)``, cut to about ``limit`` characters with its length said."""
    if len(text) > limit:
        return f"{neutral(text[:limit])}... ({len(text)} characters)"
    return neutral(text)
