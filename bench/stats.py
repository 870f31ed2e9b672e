"""Medians, percentiles and ratios; interleaving so both sides share the noise."""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


@dataclass
class Series:
    name: str
    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def percentile(self, p: float) -> float:
        data = sorted(self.seconds)
        return data[min(len(data) - 1, round(p / 100 * (len(data) - 1)))]

    def summary(self) -> dict[str, float | int | str]:
        return {
            "name": self.name,
            "n": len(self.seconds),
            "median_ms": self.median * 1e3,
            "p95_ms": self.percentile(95) * 1e3,
            "p99_ms": self.percentile(99) * 1e3,
        }


async def interleaved(
    rounds: int, cases: list[tuple[Series, Callable[[], Awaitable[object]]]]
) -> None:
    """Run each case once per round, alternating, so drift hits every side alike."""
    for _ in range(rounds):
        for series, run in cases:
            t0 = time.perf_counter()
            await run()
            series.seconds.append(time.perf_counter() - t0)
