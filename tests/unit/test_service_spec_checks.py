"""The agent refuses health-check numbers that would make a health loop spin or
never end, whoever sent them (the config checks them too, other clients may not)."""

from __future__ import annotations

import math

import pytest

from common.errors import InvalidArgumentError
from nodeagent.convert import service_from_pb
from vendetta.v1 import common_pb2


def _spec(**health: float) -> common_pb2.ServiceSpec:
    check = common_pb2.HealthCheck(tcp=80)
    for field, value in health.items():
        setattr(check, field, value)
    return common_pb2.ServiceSpec(name="web", command=["sleep", "1"], health=check)


@pytest.mark.parametrize(
    "health",
    [
        {"interval_seconds": math.nan},
        {"interval_seconds": -1.0},
        {"timeout_seconds": math.inf},
        {"start_period_seconds": 1e12},
        {"retries": -3},
    ],
)
def test_bad_health_numbers_are_refused(health: dict[str, float]) -> None:
    with pytest.raises(InvalidArgumentError, match="health-check"):
        service_from_pb(_spec(**health))


def test_good_health_numbers_and_defaults_are_kept() -> None:
    svc = service_from_pb(_spec(interval_seconds=0.5, retries=3))
    assert svc.health is not None
    assert (svc.health.interval, svc.health.retries, svc.health.timeout) == (0.5, 3, 2.0)
