"""Docker's log timestamps: the quick path for Docker's own form agrees with the full parser."""

from __future__ import annotations

import pytest

from providers.docker.streams import _TIMESTAMP, _epoch_seconds, parse_timestamp


def by_regex(text: str) -> tuple[int, str] | None:
    match = _TIMESTAMP.match(text)
    if match is None:
        return None
    head, fraction, zone = match.group(1, 2, 3)
    nanos = int(fraction.ljust(9, "0")) if fraction else 0
    return _epoch_seconds(head, zone) * 1_000_000_000 + nanos, text[match.end() :]


@pytest.mark.parametrize(
    "text",
    [
        "2026-11-29T20:30:01.123456789Z hello world",
        "2026-11-29T20:30:01.1Z x",
        "2026-11-29T20:30:01.000000001Z ",
        "2026-11-29T20:30:01.5Z",
        "2026-11-29T20:30:01Z no fraction",
        "2026-11-29T20:30:01.5+02:00 offset",
        "2026-11-29T20:30:01.123Zx",
        "2026-1x-29T20:30:01.123Z bad month",
        "2026-11-29T20:30:01.1234567890Z ten digits",
        "2026-11-29T20:30:01.12a4Z letters",
        "plain text, no stamp",
        "",
    ],
)
def test_quick_path_matches_the_full_parser(text: str) -> None:
    assert parse_timestamp(text) == by_regex(text)


def test_docker_stamp_is_unix_nanoseconds() -> None:
    assert parse_timestamp("1970-01-01T00:00:01.5Z a") == (1_500_000_000, "a")
