"""Scoring rules and calibration metrics on (prediction made before the outcome, outcome) pairs.

Every function takes array-likes (numpy, pandas, lists) and returns plain floats or DataFrames, so
the same code scores a live run, a replayed trace, or a notebook experiment. All are vectorised
over rows. Empty input gives nan rather than an error or a warning: a window of steps in which
every rollout failed is a legitimate thing to score.

`score_trace` scores a whole trace in the run-folder schema (`mpts.inference.schema`);
`run_summary` is the one per-run summary (eval accuracy, rollouts to target, effective ratio,
scores) that the loop writes to summary.json and ablate, report and replay reuse.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd
from scipy import stats

from .schema import LOOP_PHASES, SCORED_COLUMNS, SchemaError, require_columns

STATE_NAMES = ("unsolved", "partial", "solved")
UNIT_TOLERANCE = 1e-6

SCORE_KEYS = (
    "rows", "log_predictive_density", "brier", "ece", "spearman_empirical", "spearman_true",
    "auroc_informative", "coverage50", "coverage90", "coverage50_true", "coverage90_true",
    "state_accuracy",
)


# -- input checks -----------------------------------------------------------------------------

def _floats(name: str, values, *, unit: bool = False, allow_nan: bool = False,
            allow_neg_inf: bool = False) -> np.ndarray:
    """A 1-D float array; `unit` demands values in [0, 1]."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numeric") from None
    if array.ndim > 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    array = array.reshape(-1)
    bad = np.isnan(array) if not allow_nan else np.zeros(array.shape, dtype=bool)
    bad |= np.isposinf(array)
    if not allow_neg_inf:
        bad |= np.isneginf(array)
    if bad.any():
        raise ValueError(f"{name} holds {int(bad.sum())} NaN or infinite value(s)")
    if unit:
        # float32 rounding in a predictor can put a probability a hair outside [0, 1]
        if ((array < -UNIT_TOLERANCE) | (array > 1 + UNIT_TOLERANCE)).any():
            raise ValueError(f"{name} must lie in [0, 1]")
        array = np.clip(array, 0.0, 1.0)
    return array


def _counts(successes, trials) -> tuple[np.ndarray, np.ndarray]:
    s = _floats("successes", successes)
    k = _floats("trials", trials)
    _same_length(("successes", s), ("trials", k))
    if (s != np.round(s)).any():
        raise ValueError("successes must be whole numbers")
    if (k != np.round(k)).any():
        raise ValueError("trials must be whole numbers")
    if (k <= 0).any():
        raise ValueError("trials must be positive")
    if ((s < 0) | (s > k)).any():
        raise ValueError("successes must lie in [0, trials]")
    return s, k


def _same_length(*named: tuple[str, np.ndarray]) -> None:
    lengths = {name: len(array) for name, array in named}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"inputs differ in length: {lengths}")


# -- scoring rules ----------------------------------------------------------------------------

def log_predictive_density(log_probs) -> float:
    """Mean natural-log predictive probability of the observed successes (higher is better).

    -inf is allowed: a prediction that gave the observed count no probability scores -inf.
    """
    values = _floats("log_probs", log_probs, allow_neg_inf=True)
    return float(values.mean()) if values.size else math.nan


def brier_score(pred_mean, successes, trials) -> float:
    """Mean squared error of the predicted success rate against the empirical rate s/k."""
    pred = _floats("pred_mean", pred_mean, unit=True)
    s, k = _counts(successes, trials)
    _same_length(("pred_mean", pred), ("successes", s))
    return float(np.mean((pred - s / k) ** 2)) if pred.size else math.nan


# -- calibration ------------------------------------------------------------------------------

def _equal_mass_bins(pred: np.ndarray, bins: int) -> np.ndarray:
    """Bin index per row: equal-mass bins on the rank of pred, ties kept in one bin.

    Each row goes to the bin of its mid-rank, so a group of equal predictions lands together
    (binning depends only on the values, not on row order) and a dominant value simply makes its
    bin larger. Empty bins are dropped and the rest renumbered 0..m-1.
    """
    n = pred.size
    mid_rank = stats.rankdata(pred, method="average") - 1.0  # 0-based
    raw = np.minimum(np.floor((mid_rank + 0.5) * bins / n).astype(np.int64), bins - 1)
    _, dense = np.unique(raw, return_inverse=True)
    return dense.reshape(-1)


def reliability_table(pred_mean, successes, trials, bins: int = 10) -> pd.DataFrame:
    """Reliability diagram data over equal-mass bins of pred_mean.

    Columns: bin, count (rows), pred_mean (trial-weighted mean prediction, which is what the
    observed rate should match: E[sum s] = sum p*k), observed_rate (sum s / sum k), lo and hi
    (smallest and largest prediction in the bin). Fewer rows than bins gives fewer bins.
    """
    if not isinstance(bins, (int, np.integer)) or isinstance(bins, bool) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    pred = _floats("pred_mean", pred_mean, unit=True)
    s, k = _counts(successes, trials)
    _same_length(("pred_mean", pred), ("successes", s))
    columns = ["bin", "count", "pred_mean", "observed_rate", "lo", "hi"]
    if pred.size == 0:
        return pd.DataFrame({c: pd.Series(dtype="int64" if c in ("bin", "count") else "float64")
                             for c in columns})
    index = _equal_mass_bins(pred, int(bins))
    m = int(index.max()) + 1
    lo = np.full(m, np.inf)
    hi = np.full(m, -np.inf)
    np.minimum.at(lo, index, pred)
    np.maximum.at(hi, index, pred)
    return reliability_from_sums(np.bincount(index, minlength=m), np.bincount(index, weights=k, minlength=m),
                                 np.bincount(index, weights=pred * k, minlength=m),
                                 np.bincount(index, weights=s, minlength=m), lo, hi)


def reliability_from_sums(count, trials_in, weighted_pred, successes_in, lo, hi) -> pd.DataFrame:
    """The reliability table from per-bin sums: rows, trials, sum of pred * trials, successes,
    smallest and largest prediction (`scoring_stream` accumulates them a step at a time)."""
    return pd.DataFrame({
        "bin": np.arange(len(count), dtype=np.int64),
        "count": np.asarray(count).astype(np.int64),
        "pred_mean": weighted_pred / trials_in,
        "observed_rate": successes_in / trials_in,
        "lo": lo,
        "hi": hi,
    }, columns=["bin", "count", "pred_mean", "observed_rate", "lo", "hi"])


def expected_calibration_error(pred_mean, successes, trials, bins: int = 10) -> float:
    """Row-count-weighted mean ``|predicted - observed|`` over the equal-mass reliability bins."""
    return ece_of_table(reliability_table(pred_mean, successes, trials, bins))


def ece_of_table(table: pd.DataFrame) -> float:
    if table.empty:
        return math.nan
    gap = (table["pred_mean"] - table["observed_rate"]).abs().to_numpy()
    weight = table["count"].to_numpy(dtype=np.float64)
    return float((gap * weight).sum() / weight.sum())


def pit_coverage(pit, level: float) -> float:
    """Share of randomised-PIT values inside the central `level` interval of [0, 1].

    Under a calibrated predictive the randomised PIT is uniform, so this should be `level`.
    """
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")
    values = _floats("pit", pit, unit=True)
    if values.size == 0:
        return math.nan
    return float(np.mean(pit_inside(values, level)))


def pit_inside(values: np.ndarray, level: float) -> np.ndarray:
    """Which (checked, clipped) PIT values lie inside the central `level` interval."""
    tail = (1.0 - float(level)) / 2.0
    return (values >= tail) & (values <= 1.0 - tail)


def truth_coverage(lo, hi, true_p) -> float:
    """Share of known true success rates inside [lo, hi]; rows with unknown (NaN) truth are skipped."""
    low = _floats("lo", lo, unit=True)
    high = _floats("hi", hi, unit=True)
    truth = _floats("true_p", true_p, allow_nan=True)
    _same_length(("lo", low), ("hi", high), ("true_p", truth))
    if (low > high + 1e-9).any():
        raise ValueError("lo must not exceed hi")
    known = ~np.isnan(truth)
    if not known.any():
        return math.nan
    truth = truth[known]
    if ((truth < 0) | (truth > 1)).any():
        raise ValueError("true_p must lie in [0, 1]")
    return float(np.mean((low[known] <= truth) & (truth <= high[known])))


# -- ranking ----------------------------------------------------------------------------------

def spearman(x, y) -> float:
    """Spearman rank correlation over rows where both are known; nan if < 3 rows or either is constant."""
    a = _floats("x", x, allow_nan=True)
    b = _floats("y", y, allow_nan=True)
    _same_length(("x", a), ("y", b))
    known = ~(np.isnan(a) | np.isnan(b))
    a, b = a[known], b[known]
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(stats.spearmanr(a, b).statistic)


def auroc(score, label) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (ties count one half).

    nan when one class is absent.
    """
    values = _floats("score", score)
    positive = np.asarray(label)
    if positive.dtype != bool:
        as_float = _floats("label", positive)
        if not np.isin(as_float, (0.0, 1.0)).all():
            raise ValueError("label must be boolean or 0/1")
        positive = as_float == 1.0
    positive = positive.reshape(-1)
    _same_length(("score", values), ("label", positive))
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = stats.rankdata(values, method="average")
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


# -- DPS-style states -------------------------------------------------------------------------

def observed_state(successes, trials) -> np.ndarray:
    """0 unsolved (s = 0), 1 partial (0 < s < k), 2 solved (s = k), as int64."""
    s, k = _counts(successes, trials)
    return np.where(s == 0, 0, np.where(s == k, 2, 1)).astype(np.int64)


def state_confusion(pred_p_unsolved, pred_p_informative, pred_p_solved, successes, trials) -> pd.DataFrame:
    """3x3 counts: rows the observed state, columns the predicted state (argmax of the three)."""
    probs = np.stack([
        _floats("pred_p_unsolved", pred_p_unsolved, unit=True),
        _floats("pred_p_informative", pred_p_informative, unit=True),
        _floats("pred_p_solved", pred_p_solved, unit=True),
    ], axis=1)
    observed = observed_state(successes, trials)
    _same_length(("pred_p_unsolved", probs), ("successes", observed))
    predicted = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=np.int64)
    counts = np.bincount(observed * 3 + predicted, minlength=9).reshape(3, 3)
    return pd.DataFrame(counts.astype(np.int64),
                        index=pd.Index(STATE_NAMES, name="observed"),
                        columns=pd.Index(STATE_NAMES, name="predicted"))


# -- whole traces -----------------------------------------------------------------------------

def _usable_rows(trace: pd.DataFrame, required: Iterable[str]) -> pd.DataFrame:
    if not isinstance(trace, pd.DataFrame):
        raise ValueError(f"trace must be a pandas DataFrame, got {type(trace).__name__}")
    require_columns(trace, tuple(required), "trace")
    if "failed" not in trace.columns:
        return trace
    failed = trace["failed"].fillna(False).astype(bool).to_numpy()
    return trace.loc[~failed]


def _column(frame: pd.DataFrame, name: str) -> np.ndarray:
    """A trace column as float64 (nullable and object columns included), NaN for nulls."""
    try:
        return frame[name].to_numpy(dtype=np.float64, na_value=np.nan)
    except (TypeError, ValueError):
        raise ValueError(f"trace column {name} must be numeric") from None


def _true_p(trace: pd.DataFrame) -> np.ndarray | None:
    if "true_p" not in trace.columns:
        return None
    truth = _column(trace, "true_p")
    return None if np.isnan(truth).all() else truth


def score_trace(trace: pd.DataFrame) -> dict[str, float]:
    """Every score at once on a trace in the run-folder schema, ignoring failed rollouts.

    Keys: SCORE_KEYS. `*_true` scores need a `true_p` column with known values (simulator);
    otherwise they are nan. Zero usable rows gives rows = 0 and nan everywhere else.
    """
    rows = _usable_rows(trace, SCORED_COLUMNS)
    if len(rows) == 0:
        return score_columns({name: np.zeros(0) for name in SCORED_COLUMNS})
    return score_columns({name: _column(rows, name) for name in SCORED_COLUMNS}, _true_p(rows))


TRUTH_ONLY_COLUMNS = ("pred_q05", "pred_q25", "pred_q75", "pred_q95")  # scored only against a known true p


def score_columns(col: Mapping[str, np.ndarray], truth: np.ndarray | None = None) -> dict[str, float]:
    """score_trace on usable rows given as columns (any float dtype; the interval columns may be
    left out when `truth` is None). Each score converts only the columns it needs, so a replay of
    millions of rows need not hold every column as float64 at once."""
    result: dict[str, float] = {key: math.nan for key in SCORE_KEYS}
    result["rows"] = int(len(col["successes"]))
    if result["rows"] == 0:
        return result
    for name in SCORED_COLUMNS[2:]:  # check here so an error names the trace column
        if name in col or truth is not None:
            _floats(name, col[name], unit=name != "pred_log_prob", allow_neg_inf=name == "pred_log_prob")
    # the columns are passed on as given: each score makes (and drops) the float64 copies it needs
    s, k, pred = col["successes"], col["trials"], col["pred_mean"]
    _counts(s, k)
    result["log_predictive_density"] = log_predictive_density(col["pred_log_prob"])
    result["brier"] = brier_score(pred, s, k)
    result["ece"] = expected_calibration_error(pred, s, k)
    result["spearman_empirical"] = spearman(pred, np.divide(s, k, dtype=np.float64))
    result["auroc_informative"] = auroc(col["pred_p_informative"], (s > 0) & (s < k))
    result["coverage50"] = pit_coverage(col["pred_pit"], 0.5)
    result["coverage90"] = pit_coverage(col["pred_pit"], 0.9)
    confusion = state_confusion(col["pred_p_unsolved"], col["pred_p_informative"], col["pred_p_solved"], s, k)
    result["state_accuracy"] = float(np.trace(confusion.to_numpy()) / result["rows"])
    if truth is not None:
        result["spearman_true"] = spearman(pred, truth)
        result["coverage50_true"] = truth_coverage(col["pred_q25"], col["pred_q75"], truth)
        result["coverage90_true"] = truth_coverage(col["pred_q05"], col["pred_q95"], truth)
    return result


def scores_by_window(trace: pd.DataFrame, window_steps: int) -> pd.DataFrame:
    """score_trace per consecutive window of `window_steps` steps ("calibration over time").

    Windows start at the trace's first step and cover every step up to its last; a window with
    no usable rows is kept (rows = 0, scores nan) so the time axis stays regular.
    Columns: window_start, window_end (inclusive), then SCORE_KEYS.
    """
    if not isinstance(window_steps, (int, np.integer)) or isinstance(window_steps, bool) or window_steps < 1:
        raise ValueError(f"window_steps must be a positive integer, got {window_steps!r}")
    _usable_rows(trace, ("step", *SCORED_COLUMNS))
    columns = ["window_start", "window_end", *SCORE_KEYS]
    step = _floats("step", _column(trace, "step"))
    if step.size == 0:
        return pd.DataFrame(columns=columns)
    first = int(step.min())
    window = ((step - first) // int(window_steps)).astype(np.int64)
    n_windows = int(window.max()) + 1
    groups = dict(tuple(trace.groupby(window, sort=True)))
    records = []
    for index in range(n_windows):  # one iteration per window, not per row
        start = first + index * int(window_steps)
        part = groups.get(index, trace.iloc[0:0])
        records.append({"window_start": start, "window_end": start + int(window_steps) - 1, **score_trace(part)})
    return pd.DataFrame.from_records(records, columns=columns)


# -- one run ----------------------------------------------------------------------------------

# learning and selection diagnostics (training/diagnostics.py); NaN where a run did not record them
LEARNING_KEYS = ("final_eval_accuracy_greedy", "final_eval_accuracy_sampled", "eval_gain_greedy",
                 "eval_gain_sampled", "final_trained_accuracy", "mean_recent_overlap", "final_top_decile_share",
                 "mean_greedy_solved_share")
RUN_KEYS = ("final_eval_accuracy", "rollouts_to_target", "steps_to_target", "mean_effective_ratio",
            "total_rollouts", "wall_seconds", "steps", "seconds_per_step", *LEARNING_KEYS)


def steps_to_target(metrics: pd.DataFrame, target: float) -> tuple[float, float]:
    """(cumulative rollouts, step) at the first evaluation with eval_accuracy >= target; NaN if never."""
    reached = metrics[metrics["eval_accuracy"].astype(float) >= target]
    if reached.empty:
        return math.nan, math.nan
    first = reached.iloc[0]
    return float(first["cumulative_rollouts"]), float(first["step"])


def seconds_columns(metrics: pd.DataFrame) -> list[str]:
    """Per-step timing columns: the loop's phases first, then any extra `*_seconds` (not wall)."""
    present = [c for c in metrics.columns if c.endswith("_seconds") and c != "wall_seconds"]
    phases = [f"{p}_seconds" for p in LOOP_PHASES if f"{p}_seconds" in present]
    return phases + sorted(c for c in present if c not in phases)


def learning_numbers(metrics: pd.DataFrame, initial: dict[str, float]) -> dict[str, float]:
    """Final held-out accuracies, their gain over the run (mean of the last three evaluations minus
    `initial`, the evaluation before the first step) and the selection diagnostics, where recorded."""
    def column(name: str) -> pd.Series:
        return metrics[name].astype(float).dropna() if name in metrics else pd.Series(dtype=float)

    out: dict[str, float] = {}
    for kind in ("greedy", "sampled"):
        evals = column(f"eval_accuracy_{kind}")
        start = float(initial.get(f"initial_eval_accuracy_{kind}", math.nan))
        out[f"final_eval_accuracy_{kind}"] = float(evals.iloc[-1]) if len(evals) else math.nan
        out[f"eval_gain_{kind}"] = float(evals.tail(3).mean()) - start if len(evals) else math.nan
    trained, overlap, top, solved = (column(c) for c in ("trained_accuracy", "recent_overlap", "top_decile_share",
                                                         "greedy_solved_share"))
    out["final_trained_accuracy"] = float(trained.iloc[-1]) if len(trained) else math.nan
    out["mean_recent_overlap"] = float(overlap.mean()) if len(overlap) else math.nan
    out["final_top_decile_share"] = float(top.iloc[-1]) if len(top) else math.nan
    out["mean_greedy_solved_share"] = float(solved.mean()) if len(solved) else math.nan
    return out


def run_summary(trace: pd.DataFrame, metrics: pd.DataFrame, target: float,
                initial: dict[str, float] | None = None) -> dict[str, float]:
    """Every per-run number: RUN_KEYS from the step metrics (`initial`: the evaluations before the
    first step, `initial_eval_accuracy_*`, for the gains), SCORE_KEYS from the trace."""
    require_columns(metrics, ("step", "eval_accuracy", "cumulative_rollouts", "effective_ratio", "wall_seconds"),
                    "metrics")
    if metrics.empty:
        raise SchemaError("metrics has no rows: the run recorded no step")
    evals = metrics["eval_accuracy"].astype(float).dropna()
    rollouts, step = steps_to_target(metrics, target)
    steps = int(len(metrics))
    wall = float(metrics["wall_seconds"].iloc[-1])
    return {
        "final_eval_accuracy": float(evals.iloc[-1]) if len(evals) else math.nan,
        "rollouts_to_target": rollouts, "steps_to_target": step,
        "mean_effective_ratio": float(metrics["effective_ratio"].astype(float).mean()),
        "total_rollouts": int(metrics["cumulative_rollouts"].iloc[-1]),
        "wall_seconds": wall, "steps": steps, "seconds_per_step": wall / steps,
        **learning_numbers(metrics, initial or {}),
        **score_trace(trace),
    }
