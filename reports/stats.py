"""Pooling seeds: means with percentile-bootstrap confidence intervals (numpy, seeded)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

BOOTSTRAP_DRAWS = 2000
BOOTSTRAP_SEED = 20240531
LEVEL = 0.95


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A seed-pooled mean with its bootstrap interval; `n` finite values went in (of `total`)."""

    mean: float | None
    lo: float | None
    hi: float | None
    n: int
    total: int

    def as_dict(self) -> dict[str, float | int | None]:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi, "n": self.n, "total": self.total}


def _finite(values: Sequence[float | None]) -> np.ndarray:
    array = np.array([np.nan if v is None else float(v) for v in values], dtype=float)
    return array[np.isfinite(array)]


def _resample_means(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    index = rng.integers(0, values.size, size=(BOOTSTRAP_DRAWS, values.size))
    return values[index].mean(axis=1)


def bootstrap_mean(values: Sequence[float | None], *, seed: int = BOOTSTRAP_SEED) -> Estimate:
    """Mean of the finite values with a 95% percentile-bootstrap interval over them.

    Non-finite values (a run that never reached the target, a score undefined for a run) are
    left out and counted: `n` of `total`. One value gives a zero-width interval.
    """
    finite = _finite(values)
    total = len(values)
    if finite.size == 0:
        return Estimate(None, None, None, 0, total)
    mean = float(finite.mean())
    if finite.size == 1:
        return Estimate(mean, mean, mean, 1, total)
    means = _resample_means(finite, np.random.default_rng(seed))
    lo, hi = np.quantile(means, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return Estimate(mean, float(lo), float(hi), int(finite.size), total)


def bootstrap_ratio(numerator: Sequence[float | None], denominator: Sequence[float | None], *,
                    seed: int = BOOTSTRAP_SEED) -> Estimate:
    """Ratio of two seed means, each arm resampled independently."""
    top, bottom = _finite(numerator), _finite(denominator)
    total = len(numerator)
    if top.size == 0 or bottom.size == 0 or bottom.mean() == 0:
        return Estimate(None, None, None, int(top.size), total)
    ratio = float(top.mean() / bottom.mean())
    if top.size == 1 and bottom.size == 1:
        return Estimate(ratio, ratio, ratio, 1, total)
    rng = np.random.default_rng(seed)
    ratios = _resample_means(top, rng) / _resample_means(bottom, rng)
    ratios = ratios[np.isfinite(ratios)]
    lo, hi = np.quantile(ratios, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return Estimate(ratio, float(lo), float(hi), int(top.size), total)


def finite_or_none(value: float | None) -> float | None:
    """JSON-safe: NaN and infinities become None."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
