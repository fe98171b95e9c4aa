"""Pooling seeds: the one interval method behind every number mpts shows (ablate's table, the report).

A 95% Student-t interval over seeds: of an arm's per-seed values, or of its per-seed paired
differences (log ratios for ratios) with a reference arm run on the same seeds. Arms with the same
seed share their random streams (same world, same candidates, same rollout noise stream; see
`mpts.training.selector`), so pairing by seed takes the between-seed spread out of a comparison.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats

LEVEL = 0.95
METHOD = "Student-t interval over seeds; differences and ratios paired by seed"


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A mean over seeds with its interval; `n` finite values (or pairs) went in, of `total`.

    One value gives a zero-width interval (lo = hi = mean): there is no spread to estimate.
    """

    mean: float | None
    lo: float | None
    hi: float | None
    n: int
    total: int

    def as_dict(self) -> dict[str, float | int | None]:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi, "n": self.n, "total": self.total}


def _floats(values: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=float)


def _t_interval(values: np.ndarray, total: int) -> Estimate:
    """Mean and 95% t-interval of already-finite values."""
    if values.size == 0:
        return Estimate(None, None, None, 0, total)
    mean = float(values.mean())
    if values.size == 1:
        return Estimate(mean, mean, mean, 1, total)
    half = float(stats.t.ppf((1 + LEVEL) / 2, values.size - 1) * values.std(ddof=1) / math.sqrt(values.size))
    return Estimate(mean, mean - half, mean + half, int(values.size), total)


def mean_interval(values: Sequence[float | None]) -> Estimate:
    """Mean of the finite values with its 95% t-interval.

    Non-finite values (a run that never reached the target, a score undefined for a run) are
    left out and counted: `n` of `total`.
    """
    array = _floats(values)
    return _t_interval(array[np.isfinite(array)], len(array))


def _pairs(values: Mapping[int, float | None], reference: Mapping[int, float | None]) -> tuple[np.ndarray, np.ndarray]:
    seeds = sorted(set(values) & set(reference))
    mine, theirs = _floats([values[s] for s in seeds]), _floats([reference[s] for s in seeds])
    both = np.isfinite(mine) & np.isfinite(theirs)
    return mine[both], theirs[both]


def paired_difference(values: Mapping[int, float | None], reference: Mapping[int, float | None]) -> Estimate:
    """Mean over shared seeds of value - reference, with its 95% t-interval; `total` counts the arm's seeds."""
    mine, theirs = _pairs(values, reference)
    return _t_interval(mine - theirs, len(values))


def paired_ratio(values: Mapping[int, float | None], reference: Mapping[int, float | None]) -> Estimate:
    """Geometric mean over shared seeds of value / reference, the t-interval taken on log ratios.

    Only positive pairs count (a ratio of counts such as rollouts to target)."""
    mine, theirs = _pairs(values, reference)
    positive = (mine > 0) & (theirs > 0)
    logs = _t_interval(np.log(mine[positive] / theirs[positive]), len(values))
    if logs.mean is None:
        return logs
    return Estimate(math.exp(logs.mean), math.exp(logs.lo), math.exp(logs.hi), logs.n, logs.total)


def finite_or_none(value: float | None) -> float | None:
    """JSON-safe: NaN and infinities become None."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
