"""Config keys of issue 17: durations with units, workdir, user, source limits."""

from __future__ import annotations

import pytest

from common.config import parse_config, parse_duration
from common.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("1s", 1.0),
        ("2m", 120.0),
        ("1h30m", 5400.0),
        ("1m30s", 90.0),
        ("1.5s", 1.5),
        ("2", 2.0),
        ("0.25", 0.25),
        (3, 3.0),
        (0.5, 0.5),
    ],
)
def test_durations_as_compose_writes_them(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["1x", "s", "", "1 s", "1s2", "-1s", "ms500"])
def test_not_durations(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


def test_health_check_durations_take_units() -> None:
    cfg = parse_config(
        "name: x\nservices:\n  db:\n    command: x\n"
        "    health_check: {tcp: 5432, interval: 1s, timeout: 500ms, start_period: 2m}\n"
    )
    hc = cfg.services["db"].health_check
    assert hc is not None
    assert (hc.interval, hc.timeout, hc.start_period) == (1.0, 0.5, 120.0)


def test_a_bad_duration_names_the_key() -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config("name: x\nservices:\n  db: {command: x, health_check: {tcp: 1, interval: 1x}}")
    assert "services.db.health_check.interval: '1x' is not a duration" in str(exc.value)


def test_zero_interval_is_refused() -> None:
    with pytest.raises(ConfigError, match="interval"):
        parse_config("name: x\nservices:\n  db: {command: x, health_check: {tcp: 1, interval: 0s}}")


def test_workdir_user_and_source_defaults() -> None:
    cfg = parse_config("name: x\n")
    assert (cfg.workdir, cfg.user) == ("/workspace", None)
    assert (cfg.source.max_bytes, cfg.source.max_files) == (500 * 1024**2, 50_000)


def test_workdir_user_and_source_set() -> None:
    cfg = parse_config("name: x\nworkdir: /src/\nuser: dev\nsource: {max_size: 1G, max_files: 9}\n")
    assert (cfg.workdir, cfg.user) == ("/src", "dev")
    assert (cfg.source.max_bytes, cfg.source.max_files) == (1024**3, 9)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("workdir: src", "workdir: 'src': use an absolute path"),
        ("workdir: /a/../b", "use an absolute path"),
        ("user: 'two words'", "user: 'two words': use a user name"),
        ("source: {max_size: lots}", "source.max_size: 'lots' is not a size"),
        ("source: {max_files: 0}", "source.max_files"),
        ("source: {other: 1}", "source.other: unknown key"),
    ],
)
def test_bad_workdir_user_source(line: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        parse_config(f"name: x\n{line}\n")
