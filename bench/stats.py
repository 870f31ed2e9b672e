"""Medians, percentiles and ratios; interleaving so both sides share the noise."""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Series:
    """Samples of one measure: seconds (latencies) or any unit given in ``unit``."""

    name: str
    seconds: list[float] = field(default_factory=list)
    unit: str = "ms"  # "ms": samples are seconds shown as ms; else samples are in this unit

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def percentile(self, p: float) -> float:
        data = sorted(self.seconds)
        return data[min(len(data) - 1, round(p / 100 * (len(data) - 1)))]

    def summary(self) -> dict[str, Any]:
        if self.unit == "ms":
            return {
                "name": self.name,
                "n": len(self.seconds),
                "median_ms": self.median * 1e3,
                "p95_ms": self.percentile(95) * 1e3,
                "p99_ms": self.percentile(99) * 1e3,
            }
        return {
            "name": self.name,
            "n": len(self.seconds),
            "unit": self.unit,
            "median": self.median,
            "p5": self.percentile(5),
            "min": min(self.seconds),
            "max": max(self.seconds),
        }


def row(series: Series, base: Series | None = None, **extra: Any) -> dict[str, Any]:
    """A result row: the series' summary, its samples, and its ratio to ``base``."""
    r = series.summary()
    r["samples"] = list(series.seconds)
    if base is not None and base.seconds and series.seconds:
        r["baseline"] = base.name
        r["ratio"] = series.median / base.median if base.median else float("nan")
        if series.unit == "ms":
            r["added_ms"] = (series.median - base.median) * 1e3
    r.update(extra)
    return r


async def interleaved(
    rounds: int, cases: list[tuple[Series, Callable[[], Awaitable[object]]]]
) -> None:
    """Run each case once per round, alternating, so drift hits every side alike."""
    for _ in range(rounds):
        for series, run in cases:
            t0 = time.perf_counter()
            await run()
            series.seconds.append(time.perf_counter() - t0)
