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

# per-run numbers pooled over seeds in every group
RUN_NUMBERS = (
    "final_eval_accuracy", "rollouts_to_target", "steps_to_target", "mean_effective_ratio",
    "total_rollouts", "wall_seconds", "seconds_per_step", *[k for k in SCORE_KEYS if k != "rows"],
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
    numbers.update(score_trace(run.trace))
    numbers["time_per_step"] = {c: float(metrics[c].astype(float).mean()) for c in seconds_columns(metrics)}
    return numbers


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


def _baseline_group(groups: dict[str, list[dict[str, Any]]], predictor: str, rule: str, point: str = "") -> str | None:
    """The group of `rule` at the same grid point with the same predictor, else at the same point,
    else with the same predictor, else the first group of that rule."""
    candidates = sorted(g for g, rows in groups.items() if rows[0]["acquisition"] == rule)
    at_point = [g for g in candidates if groups[g][0].get("point_label", "") == point]
    same = [g for g in at_point or candidates if groups[g][0]["predictor_label"] == predictor]
    return (same or at_point or candidates or [None])[0]


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
            baseline = _baseline_group(groups, first["predictor_label"], rule, first.get("point_label", ""))
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
