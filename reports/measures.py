"""The numbers of a report: per run (recomputed from the parquet files) and per group (seeds pooled).

Every per-run number is recomputed from trace.parquet / metrics.parquet rather than copied from
the run's summary.json, so a report over replayed or hand-made traces is scored the same way; a
recorded summary that disagrees is reported as a warning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from mpts.inference.scoring import SCORE_KEYS, score_trace

from .runs import Run
from .stats import Estimate, bootstrap_mean, bootstrap_ratio, finite_or_none

UNIFORM = "uniform"
DYNAMIC_SAMPLING = "dynamic_sampling"
LOOP_PHASES = ("predict", "select", "rollout", "observe", "train")

# learning and selection diagnostics (training/diagnostics.py); NaN where a run did not record them
LEARNING_NUMBERS = (
    "final_eval_accuracy_greedy", "final_eval_accuracy_sampled", "eval_gain_greedy", "eval_gain_sampled",
    "final_trained_accuracy", "mean_recent_overlap", "final_top_decile_share", "mean_greedy_solved_share",
)
# per-run numbers pooled over seeds in every group
RUN_NUMBERS = (
    "final_eval_accuracy", "rollouts_to_target", "steps_to_target", "mean_effective_ratio",
    "total_rollouts", "wall_seconds", "seconds_per_step", *[k for k in SCORE_KEYS if k != "rows"],
    *LEARNING_NUMBERS,
)
RECORDED_CHECKED = ("final_eval_accuracy", "rollouts_to_target", "mean_effective_ratio", "total_rollouts",
                    "wall_seconds", *SCORE_KEYS)


def seconds_columns(metrics: pd.DataFrame) -> list[str]:
    """Per-step timing columns: the loop's phases first, then any extra `*_seconds` (not wall)."""
    present = [c for c in metrics.columns if c.endswith("_seconds") and c != "wall_seconds"]
    phases = [f"{p}_seconds" for p in LOOP_PHASES if f"{p}_seconds" in present]
    return phases + sorted(c for c in present if c not in phases)


def first_reaching(metrics: pd.DataFrame, target: float) -> tuple[float, float]:
    """(cumulative rollouts, step) at the first evaluation with eval_accuracy >= target; NaN if never."""
    reached = metrics[metrics["eval_accuracy"].astype(float) >= target]
    if reached.empty:
        return math.nan, math.nan
    first = reached.iloc[0]
    return float(first["cumulative_rollouts"]), float(first["step"])


def run_numbers(run: Run, target: float) -> dict[str, Any]:
    metrics = run.metrics
    evals = metrics["eval_accuracy"].astype(float).dropna()
    rollouts, step = first_reaching(metrics, target)
    numbers: dict[str, Any] = {
        "final_eval_accuracy": float(evals.iloc[-1]) if len(evals) else math.nan,
        "rollouts_to_target": rollouts,
        "steps_to_target": step,
        "mean_effective_ratio": float(metrics["effective_ratio"].astype(float).mean()),
        "total_rollouts": int(metrics["cumulative_rollouts"].iloc[-1]),
        "wall_seconds": float(metrics["wall_seconds"].iloc[-1]),
        "steps": int(len(metrics)),
    }
    numbers["seconds_per_step"] = numbers["wall_seconds"] / numbers["steps"]
    numbers.update(learning_numbers(metrics, run.recorded_summary or {}))
    numbers.update(score_trace(run.trace))
    numbers["time_per_step"] = {c: float(metrics[c].astype(float).mean()) for c in seconds_columns(metrics)}
    return numbers


def learning_numbers(metrics: pd.DataFrame, summary: dict[str, Any]) -> dict[str, float]:
    """Final held-out accuracies, their gain over the run (mean of the last three evaluations minus
    the evaluation before the first step) and the selection diagnostics, where recorded."""
    def column(name: str) -> pd.Series:
        return metrics[name].astype(float).dropna() if name in metrics else pd.Series(dtype=float)

    out: dict[str, float] = {}
    for kind in ("greedy", "sampled"):
        evals = column(f"eval_accuracy_{kind}")
        initial = summary.get(f"initial_eval_accuracy_{kind}", math.nan)
        out[f"final_eval_accuracy_{kind}"] = float(evals.iloc[-1]) if len(evals) else math.nan
        out[f"eval_gain_{kind}"] = float(evals.tail(3).mean()) - float(initial) if len(evals) else math.nan
    trained, overlap, top, solved = (column(c) for c in ("trained_accuracy", "recent_overlap", "top_decile_share",
                                                         "greedy_solved_share"))
    out["final_trained_accuracy"] = float(trained.iloc[-1]) if len(trained) else math.nan
    out["mean_recent_overlap"] = float(overlap.mean()) if len(overlap) else math.nan
    out["final_top_decile_share"] = float(top.iloc[-1]) if len(top) else math.nan
    out["mean_greedy_solved_share"] = float(solved.mean()) if len(solved) else math.nan
    return out


def recorded_mismatches(run: Run, numbers: dict[str, Any], target: float) -> list[str]:
    """Keys where the run's own summary.json disagrees with the recomputed value.

    Rollouts to target are compared only when the report uses the run's own target accuracy.
    """
    recorded = run.recorded_summary
    if recorded is None:
        return []
    own_target = recorded.get("target_accuracy", run.target_accuracy)
    wrong = []
    for key in RECORDED_CHECKED:
        if key not in recorded or (key == "rollouts_to_target" and not math.isclose(own_target, target)):
            continue
        mine, theirs = numbers[key], recorded[key]
        mine_missing = mine is None or (isinstance(mine, float) and math.isnan(mine))
        theirs_missing = theirs is None or (isinstance(theirs, float) and math.isnan(theirs))
        if mine_missing and theirs_missing:
            continue
        if mine_missing != theirs_missing or not math.isclose(float(mine), float(theirs), rel_tol=1e-6, abs_tol=1e-9):
            wrong.append(f"{key} (summary.json {theirs!r}, recomputed {mine!r})")
    return wrong


def sees_truth(rule: str) -> bool:
    """Whether an acquisition rule selects with the true success rates (the oracle): a reference arm."""
    try:
        from mpts.training.acquisition import get_acquisition_class

        return bool(getattr(get_acquisition_class(rule), "needs_truth", False))
    except (ImportError, KeyError):  # a rule registered only in another process (a notebook's)
        return False


def _baseline_group(groups: dict[str, list[dict[str, Any]]], predictor: str, rule: str) -> str | None:
    """The group of `rule` with the same predictor, else the first group of that rule."""
    candidates = sorted(g for g, rows in groups.items() if rows[0]["acquisition"] == rule)
    same = [g for g in candidates if groups[g][0]["predictor_label"] == predictor]
    return (same or candidates or [None])[0]


def pool_groups(run_rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per group: every RUN_NUMBERS entry as a bootstrap Estimate, plus ratios to the baselines."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in run_rows:
        groups.setdefault(row["group"], []).append(row)
    pooled = []
    for name, rows in groups.items():
        first = rows[0]
        estimates: dict[str, Estimate] = {key: bootstrap_mean([r[key] for r in rows]) for key in RUN_NUMBERS}
        seconds = sorted({c for r in rows for c in r["time_per_step"]})
        timing = {c: bootstrap_mean([r["time_per_step"].get(c, math.nan) for r in rows]) for c in seconds}
        ratios: dict[str, dict[str, Any]] = {}
        for rule in (UNIFORM, DYNAMIC_SAMPLING):
            baseline = _baseline_group(groups, first["predictor_label"], rule)
            if baseline is None:
                continue
            estimate = bootstrap_ratio([r["rollouts_to_target"] for r in rows],
                                       [r["rollouts_to_target"] for r in groups[baseline]])
            ratios[rule] = {"baseline": baseline, **estimate.as_dict()}
        pooled.append({
            "group": name, "predictor": first["predictor_label"], "acquisition": first["acquisition_label"],
            "seeds": [r["seed"] for r in rows], "runs": [r["run"] for r in rows],
            "reached_target": int(sum(np.isfinite(r["rollouts_to_target"]) for r in rows)),
            "estimates": estimates, "time_per_step": timing, "rollouts_ratio": ratios,
            "has_elbo": any(r["has_elbo"] for r in rows), "has_posterior_draws": any(r["has_draws"] for r in rows),
            "reference": sees_truth(first["acquisition"]),
        })
    return pooled


def json_ready(value: Any) -> Any:
    """Estimates to dicts, NaN to None, numpy scalars to Python, recursively."""
    if isinstance(value, Estimate):
        return value.as_dict()
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return finite_or_none(float(value))
    return value
