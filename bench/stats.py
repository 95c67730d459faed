"""Pure statistics: medians, percentiles and the spread of rounds (no I/O, unit-tested)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


def median(values: Sequence[float]) -> float:
    """The median; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return float(ordered[mid])
    return (ordered[mid - 1] + ordered[mid]) / 2


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation between closest ranks; NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError("q must be within 0..100")
    if not values:
        return math.nan
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True, slots=True)
class Summary:
    """Several rounds of one metric: median, extremes and relative spread."""

    median: float
    low: float
    high: float
    count: int

    @property
    def spread(self) -> float:
        """(high - low) / median, as a fraction; 0 for one round, NaN when undefined."""
        if self.count == 0 or not self.median or math.isnan(self.median):
            return math.nan
        return (self.high - self.low) / abs(self.median)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, with the spread spelled out."""
        return {**asdict(self), "spread": self.spread}


def summarize(values: Sequence[float | None]) -> Summary:
    """Median, min and max of the values that are present (None and NaN are left out)."""
    present = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not present:
        return Summary(math.nan, math.nan, math.nan, 0)
    return Summary(median(present), min(present), max(present), len(present))


def rate(count: int, seconds: float) -> float:
    """Messages per second; NaN when no time passed."""
    return count / seconds if seconds > 0 else math.nan


def steady_rate(samples: Sequence[tuple[float, int]], total: int, lo: float = 0.1, hi: float = 0.9) -> float:
    """Rate between the moments `lo` and `hi` of `total` were done, from (time, done) samples.

    Leaves out the start (workers warming up, starting at different moments) and the tail.
    """
    t_lo = _first_reaching(samples, math.ceil(total * lo))
    t_hi = _first_reaching(samples, math.ceil(total * hi))
    if t_lo is None or t_hi is None or t_hi <= t_lo:
        return math.nan
    done_lo = next(c for t, c in samples if t == t_lo)
    done_hi = next(c for t, c in samples if t == t_hi)
    return (done_hi - done_lo) / (t_hi - t_lo)


def _first_reaching(samples: Sequence[tuple[float, int]], target: int) -> float | None:
    for t, done in samples:
        if done >= target:
            return t
    return None


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator; NaN when either is missing or the denominator is 0."""
    if math.isnan(numerator) or math.isnan(denominator) or denominator == 0:
        return math.nan
    return numerator / denominator
