"""The numbers of a report: per run (recomputed from the parquet files) and per group (seeds pooled).

Every per-run number is recomputed from trace.parquet / metrics.parquet with the function the loop
wrote summary.json with (`mpts.inference.scoring.run_summary`), so a report over replayed or
hand-made traces is scored the same way; a recorded summary that disagrees (an edited file, rows
lost between the run and the report) is reported as a warning. Which arms are references is read
from the run's summary.json: nothing here imports `mpts.training`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from mpts.inference.scoring import RUN_KEYS, SCORE_KEYS, run_summary, seconds_columns

from .runs import Run
from .stats import Estimate, finite_or_none, mean_interval, paired_difference, paired_ratio

# Reference arms for runs whose summary.json does not say (hand-made or older runs).
DEFAULT_BASELINES = ("uniform", "dynamic_sampling")

# per-run numbers pooled over seeds in every group
RUN_NUMBERS = (*[k for k in RUN_KEYS if k != "steps"], *[k for k in SCORE_KEYS if k != "rows"],
               "predictor_time_share")
PREDICTOR_PHASES = ("predict_seconds", "observe_seconds")  # the predictor's own work in a step
RECORDED_CHECKED = ("final_eval_accuracy", "rollouts_to_target", "mean_effective_ratio", "total_rollouts",
                    "wall_seconds", *SCORE_KEYS)
# paired differences against each baseline arm (same seeds)
PAIRED_NUMBERS = ("rollouts_to_target", "final_eval_accuracy", "mean_effective_ratio")


def run_numbers(run: Run, target: float) -> dict[str, Any]:
    """The run's summary (the same function the loop wrote summary.json with), plus timings."""
    numbers: dict[str, Any] = run_summary(run.trace, run.metrics, target, run.recorded_summary)
    numbers["time_per_step"] = {c: float(run.metrics[c].astype(float).mean()) for c in seconds_columns(run.metrics)}
    numbers["predictor_time_share"] = predictor_time_share(run.metrics)
    return numbers


def predictor_time_share(metrics: pd.DataFrame) -> float:
    """Share of the run's wall time spent in the predictor (predict + observe); NaN without timings."""
    if not all(c in metrics for c in PREDICTOR_PHASES) or metrics.empty:
        return math.nan
    wall = float(metrics["wall_seconds"].astype(float).iloc[-1])
    spent = float(sum(metrics[c].astype(float).sum() for c in PREDICTOR_PHASES))
    return spent / wall if wall > 0 else math.nan


def reference_role(run: Run) -> str | None:
    """"sees_truth" (the rule ranks on the true p: an upper bound), "baseline" or None, as the run
    recorded it; runs without that record: the default baselines by rule name."""
    recorded = run.recorded_summary or {}
    if "reference" in recorded:
        return recorded["reference"]
    return "baseline" if run.acquisition in DEFAULT_BASELINES else None


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


def _baseline_group(groups: dict[str, list[dict[str, Any]]], predictor: str, rule: str,
                    point: dict[str, str] | None = None) -> str | None:
    """The group of `rule` at the same ablation-grid point (its point a part of this one: a key the
    baseline does not take is not in its point) with the same predictor, else at that point, else
    with the same predictor, else the first group of that rule."""
    candidates = sorted(g for g, rows in groups.items() if rows[0]["acquisition"] == rule)
    at_point = [g for g in candidates if groups[g][0].get("point", {}).items() <= (point or {}).items()]
    same = [g for g in at_point or candidates if groups[g][0]["predictor_label"] == predictor]
    return (same or at_point or candidates or [None])[0]


def _by_seed(rows: Sequence[dict[str, Any]], key: str) -> dict[int, float]:
    return {r["seed"]: r[key] for r in rows}


def pool_groups(run_rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per group: every RUN_NUMBERS entry as an Estimate, and paired comparisons with each baseline:
    `rollouts_ratio[rule]` and `paired_differences[rule][key]` over the seeds both arms ran."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in run_rows:
        groups.setdefault(row["group"], []).append(row)
    baselines = sorted({r["acquisition"] for r in run_rows if r["reference"] == "baseline"})
    pooled = []
    for name, rows in groups.items():
        first = rows[0]
        estimates: dict[str, Estimate] = {key: mean_interval([r.get(key, math.nan) for r in rows])
                                          for key in RUN_NUMBERS}
        seconds = sorted({c for r in rows for c in r["time_per_step"]})
        timing = {c: mean_interval([r["time_per_step"].get(c, math.nan) for r in rows]) for c in seconds}
        ratios: dict[str, dict[str, Any]] = {}
        differences: dict[str, dict[str, Any]] = {}
        for rule in baselines:
            baseline = _baseline_group(groups, first["predictor_label"], rule, first.get("point"))
            reference = groups[baseline]
            ratio = paired_ratio(_by_seed(rows, "rollouts_to_target"), _by_seed(reference, "rollouts_to_target"))
            ratios[rule] = {"baseline": baseline, **ratio.as_dict()}
            differences[rule] = {"baseline": baseline, **{
                key: paired_difference(_by_seed(rows, key), _by_seed(reference, key)) for key in PAIRED_NUMBERS}}
        pooled.append({
            "group": name, "predictor": first["predictor_label"], "acquisition": first["acquisition_label"],
            "seeds": [r["seed"] for r in rows], "runs": [r["run"] for r in rows],
            "reached_target": int(sum(np.isfinite(r["rollouts_to_target"]) for r in rows)),
            "estimates": estimates, "time_per_step": timing, "rollouts_ratio": ratios,
            "paired_differences": differences,
            "has_elbo": any(r["has_elbo"] for r in rows), "has_posterior_draws": any(r["has_draws"] for r in rows),
            "reference": first["reference"] == "sees_truth", "baseline": first["reference"] == "baseline",
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
