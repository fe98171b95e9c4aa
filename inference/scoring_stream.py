"""`score_columns` of a replay, accumulated a step at a time in 20 bytes per scored row.

A replay of 10^7 prompts scores 10^7 rows; holding every scored column as float64 and ranking
with scipy (which copies and stacks its inputs) took ~1.2 GB on top of the predictor. Here each
step's columns are checked as `score_columns` checks them, the scores that are counts (PIT
coverage, state accuracy) are counted on the spot, and only what a score over all rows needs is
kept, compactly: the predicted mean, P(informative) and log density (float32, what the predictors
compute in) and the counts (int32; at most 2**24). At the end the rank-based scores are computed
on sorted copies of those arrays, a block of rows at a time: a row's average rank is the middle of
its value's run in the sorted copy (`searchsorted` left and right), which is what
`scipy.stats.rankdata(method="average")` gives.

Every score equals `score_columns` on the same rows bit for bit (same operations in the same
order), except `spearman_empirical`: its correlation of ranks is summed block by block instead of
by `np.corrcoef`, so it agrees to rounding (within 1e-12; tests/test_scoring_stream.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from .scoring import (SCORE_KEYS, _counts, _floats, ece_of_table, pit_inside, reliability_from_sums,
                      state_confusion)
from .schema import SCORED_COLUMNS

KEPT_BYTES_PER_ROW = 3 * 4 + 2 * 4  # pred_mean, pred_p_informative, pred_log_prob (float32), successes, trials (int32)
# the most alive at once while scoring, on top of the kept arrays: brier's float64 row terms (16 bytes),
# or the sorted copies spearman ranks against (pred float32 4 + s/k float64 8); blocks are small
SCORING_BYTES_PER_ROW = 16
BLOCK_ROWS = 1 << 18
BLOCK_BYTES_PER_ROW = 48  # a block's searchsorted indices (2 x int64), ranks and their products (float64)
_TRUTH_ONLY = ("pred_q05", "pred_q25", "pred_q75", "pred_q95")


class StreamedScores:
    """Add a step's scored columns with `add`; `result()` is `score_columns` of all of them."""

    def __init__(self, capacity: int | None = None):
        """`capacity`: the number of rows that will be added, when known (arrays are allocated
        once); otherwise steps are kept as pieces and joined once, one array at a time."""
        self._capacity = capacity
        self._pieces: dict[str, list[np.ndarray]] = {name: [] for name in ("pred", "informative", "log", "s", "k")}
        self._arrays: dict[str, np.ndarray] = {}
        if capacity is not None:
            dtypes = {"pred": np.float32, "informative": np.float32, "log": np.float32, "s": np.int32, "k": np.int32}
            self._arrays = {name: np.empty(capacity, dtype) for name, dtype in dtypes.items()}
        self.rows = 0
        self._inside50 = self._inside90 = self._state_right = 0

    def add(self, col: Mapping[str, np.ndarray]) -> None:
        n = len(col["successes"])
        for name in SCORED_COLUMNS[2:]:  # the checks of score_columns, so an error names the column
            if name not in _TRUTH_ONLY:
                _floats(name, col[name], unit=name != "pred_log_prob", allow_neg_inf=name == "pred_log_prob")
        s, k = _counts(col["successes"], col["trials"])
        pit = _floats("pred_pit", col["pred_pit"], unit=True)
        self._inside50 += int(pit_inside(pit, 0.5).sum())
        self._inside90 += int(pit_inside(pit, 0.9).sum())
        confusion = state_confusion(col["pred_p_unsolved"], col["pred_p_informative"], col["pred_p_solved"], s, k)
        self._state_right += int(np.trace(confusion.to_numpy()))
        values = {"pred": col["pred_mean"], "informative": col["pred_p_informative"], "log": col["pred_log_prob"],
                  "s": s, "k": k}
        if self._capacity is not None:
            if self.rows + n > self._capacity:
                raise ValueError(f"more scored rows than the {self._capacity} announced")
            for name, value in values.items():
                self._arrays[name][self.rows:self.rows + n] = value
        else:
            for name, value in values.items():
                dtype = np.int32 if name in ("s", "k") else np.float32
                self._pieces[name].append(np.asarray(value).astype(dtype))
        self.rows += n

    def _columns(self) -> dict[str, np.ndarray]:
        if self._capacity is not None:
            return {name: array[:self.rows] for name, array in self._arrays.items()}
        for name in list(self._pieces):  # one array at a time: its pieces and the whole never all coexist
            self._arrays[name] = np.concatenate(self._pieces.pop(name))
        return self._arrays

    def result(self) -> dict[str, float]:
        out: dict[str, float] = {key: math.nan for key in SCORE_KEYS}
        out["rows"] = n = self.rows
        if n == 0:
            return out
        col = self._columns()
        pred, s, k = col["pred"], col["s"], col["k"]
        out["log_predictive_density"] = float(col["log"].astype(np.float64).mean())
        out["brier"] = _brier(pred, s, k)
        out["coverage50"], out["coverage90"] = self._inside50 / n, self._inside90 / n
        out["state_accuracy"] = float(self._state_right / n)
        out["auroc_informative"] = _auroc_informative(col["informative"], s, k)
        ordered = np.sort(pred)  # unclipped, as spearman ranks it; clipped in place for the ECE after
        out["spearman_empirical"] = _spearman_with_rate(pred, ordered, s, k)
        np.clip(ordered, 0.0, 1.0, out=ordered)
        out["ece"] = _ece(np.clip(pred, 0.0, 1.0) if _outside_unit(pred) else pred, ordered, s, k)
        return out


def _outside_unit(pred: np.ndarray) -> bool:
    return bool((pred < 0).any() or (pred > 1).any())


def _blocks(n: int):
    for start in range(0, n, BLOCK_ROWS):
        yield slice(start, min(n, start + BLOCK_ROWS))


def _mid_ranks(ordered: np.ndarray, values: np.ndarray) -> np.ndarray:
    """1-based average ranks of `values` among `ordered` (sorted; same dtype), as float64."""
    return (np.searchsorted(ordered, values, "left") + np.searchsorted(ordered, values, "right") + 1) / 2.0


def _brier(pred: np.ndarray, s: np.ndarray, k: np.ndarray) -> float:
    """brier_score's mean((clip(pred) - s/k)**2) over the same float64 array, built in place."""
    terms = np.clip(pred, 0.0, 1.0).astype(np.float64)
    rate = s.astype(np.float64)
    np.divide(rate, k, out=rate)
    terms -= rate
    del rate
    np.multiply(terms, terms, out=terms)
    return float(np.mean(terms))


def _ece(pred: np.ndarray, ordered: np.ndarray, s: np.ndarray, k: np.ndarray, bins: int = 10) -> float:
    """expected_calibration_error: equal-mass bins on the mid-rank of the clipped prediction;
    per-bin sums added in row order (np.add.at), as np.bincount adds them."""
    n = len(pred)
    raw = np.empty(n, np.int8)
    for block in _blocks(n):
        mid_rank = _mid_ranks(ordered, pred[block]) - 1.0
        raw[block] = np.minimum(np.floor((mid_rank + 0.5) * bins / n).astype(np.int64), bins - 1)
    used = np.unique(raw)  # empty bins dropped, the rest renumbered
    m = len(used)
    count, trials_in, weighted, successes_in = (np.zeros(m) for _ in range(4))
    lo, hi = np.full(m, np.inf), np.full(m, -np.inf)
    for block in _blocks(n):
        index = np.searchsorted(used, raw[block])
        p, kk, ss = pred[block].astype(np.float64), k[block].astype(np.float64), s[block].astype(np.float64)
        np.add.at(count, index, 1.0)
        np.add.at(trials_in, index, kk)
        np.add.at(weighted, index, p * kk)
        np.add.at(successes_in, index, ss)
        np.minimum.at(lo, index, p)
        np.maximum.at(hi, index, p)
    return ece_of_table(reliability_from_sums(count, trials_in, weighted, successes_in, lo, hi))


def _spearman_with_rate(pred: np.ndarray, ordered: np.ndarray, s: np.ndarray, k: np.ndarray) -> float:
    """spearman(pred, s/k): the correlation of average ranks, summed a block at a time."""
    n = len(pred)
    rates = s.astype(np.float64)
    np.divide(rates, k, out=rates)
    rates.sort()
    if n < 3 or ordered[0] == ordered[-1] or rates[0] == rates[-1]:
        return math.nan
    middle = (n + 1) / 2.0  # the mean of average ranks, ties or not
    ab = aa = bb = 0.0
    for block in _blocks(n):
        a = _mid_ranks(ordered, pred[block]) - middle
        b = _mid_ranks(rates, s[block] / k[block]) - middle
        ab, aa, bb = ab + float(a @ b), aa + float(a @ a), bb + float(b @ b)
    return float(np.clip(ab / math.sqrt(aa * bb), -1.0, 1.0))


def _auroc_informative(score: np.ndarray, s: np.ndarray, k: np.ndarray) -> float:
    """auroc(score, 0 < s < k): the positives' rank sum is a sum of half-integers, exact in any order."""
    n = len(score)
    positive_count = 0
    twice_rank_sum = 0  # integer: 2 x the positives' average ranks
    ordered = np.sort(score)
    for block in _blocks(n):
        positive = (s[block] > 0) & (s[block] < k[block])
        values = score[block][positive]
        positive_count += int(positive.sum())
        twice_rank_sum += int((np.searchsorted(ordered, values, "left") + np.searchsorted(ordered, values, "right")
                               + 1).sum())
    n_neg = n - positive_count
    if positive_count == 0 or n_neg == 0:
        return math.nan
    u = np.float64(twice_rank_sum / 2) - positive_count * (positive_count + 1) / 2.0
    return float(u / (positive_count * n_neg))
