"""Tables of the report as plain data (columns, rows of cells), rendered to HTML and Markdown alike.

The headline and calibration tables show seed means with their 95% t-interval and mark the best
value of each column (highest, lowest, or closest to the nominal level for coverage); the paired
table shows differences with the baseline arms, seed by seed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd

from .measures import PAIRED_NUMBERS
from .stats import Estimate


@dataclasses.dataclass(frozen=True)
class Cell:
    text: str
    interval: str = ""  # "[lo, hi]" under the value
    best: bool = False
    note: str = ""  # e.g. "2/3 seeds"


@dataclasses.dataclass(frozen=True)
class Table:
    key: str
    columns: list[str]
    rows: list[list[Cell]]
    caption: str = ""
    label_columns: int = 1  # leading columns that name the row (never marked best)


@dataclasses.dataclass(frozen=True)
class Column:
    """A pooled number shown as a column: where to find it, how to print it, which way is better."""

    key: str
    label: str
    better: str | float | None  # "max", "min", a nominal level (closest wins), or None
    fmt: Callable[[float], str]
    pick: Callable[[dict[str, Any]], Estimate | None]
    censored: bool = False  # a missing seed value means "not reached": more seeds reaching ranks first


def fmt_rate(x: float) -> str:
    return f"{x:.3f}"


def fmt_count(x: float) -> str:
    return f"{x:,.0f}"


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}"


def fmt_seconds(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}"


def time_unit(values: Sequence[float | None]) -> tuple[str, float]:
    """("ms", 1000) when every duration is under a second, else ("s", 1): short, readable numbers."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return ("ms", 1000.0) if finite and max(finite) < 1.0 else ("s", 1.0)


Pick = Callable[[dict[str, Any]], "Estimate | None"]


def _scaled(pick: Pick, scale: float) -> Pick:
    def scaled(group: dict[str, Any]) -> Estimate | None:
        e = pick(group)
        if e is None or e.mean is None or scale == 1.0:
            return e
        return Estimate(e.mean * scale, e.lo * scale, e.hi * scale, e.n, e.total)
    return scaled


def fmt_score(x: float) -> str:
    return f"{x:.3f}" if abs(x) < 100 else f"{x:.1f}"


def _estimate(key: str) -> Callable[[dict[str, Any]], Estimate | None]:
    return lambda group: group["estimates"][key]


def _ratio(rule: str) -> Callable[[dict[str, Any]], Estimate | None]:
    def pick(group: dict[str, Any]) -> Estimate | None:
        ratio = group["rollouts_ratio"].get(rule)
        if ratio is None:
            return None
        return Estimate(ratio["mean"], ratio["lo"], ratio["hi"], ratio["n"], ratio["total"])
    return pick


CALIBRATION_COLUMNS = [
    Column("log_predictive_density", "log pred. density (nats) ↑", "max", fmt_score,
           _estimate("log_predictive_density")),
    Column("brier", "Brier ↓", "min", fmt_score, _estimate("brier")),
    Column("ece", "ECE ↓", "min", fmt_score, _estimate("ece")),
    Column("spearman_empirical", "Spearman vs s/k ↑", "max", fmt_score, _estimate("spearman_empirical")),
    Column("spearman_true", "Spearman vs true p ↑", "max", fmt_score, _estimate("spearman_true")),
    Column("auroc_informative", "AUROC P(informative) ↑", "max", fmt_score, _estimate("auroc_informative")),
    Column("coverage50", "PIT in 50% (→0.5)", 0.5, fmt_rate, _estimate("coverage50")),
    Column("coverage90", "PIT in 90% (→0.9)", 0.9, fmt_rate, _estimate("coverage90")),
    Column("coverage50_true", "true p in 50% (→0.5)", 0.5, fmt_rate, _estimate("coverage50_true")),
    Column("coverage90_true", "true p in 90% (→0.9)", 0.9, fmt_rate, _estimate("coverage90_true")),
    Column("state_accuracy", "state accuracy ↑", "max", fmt_rate, _estimate("state_accuracy")),
]


LEARNING_COLUMNS = [
    Column("final_eval_accuracy_greedy", "final held-out greedy ↑", "max", fmt_rate,
           _estimate("final_eval_accuracy_greedy")),
    Column("eval_gain_greedy", "greedy gain ↑", "max", fmt_score, _estimate("eval_gain_greedy")),
    Column("final_eval_accuracy_sampled", "final held-out sampled ↑", "max", fmt_rate,
           _estimate("final_eval_accuracy_sampled")),
    Column("eval_gain_sampled", "sampled gain ↑", "max", fmt_score, _estimate("eval_gain_sampled")),
    Column("final_trained_accuracy", "final accuracy on recently trained prompts", None, fmt_rate,
           _estimate("final_trained_accuracy")),
    Column("mean_recent_overlap", "batch overlap with last 20 steps", None, fmt_rate,
           _estimate("mean_recent_overlap")),
    Column("final_top_decile_share", "updates on top 10% of prompts", None, fmt_rate,
           _estimate("final_top_decile_share")),
    Column("mean_greedy_solved_share", "batch already solved greedily", None, fmt_rate,
           _estimate("mean_greedy_solved_share")),
]


def headline_columns(groups: Sequence[dict[str, Any]]) -> list[Column]:
    columns = [
        Column("final_eval_accuracy", "final eval accuracy ↑", "max", fmt_rate, _estimate("final_eval_accuracy")),
        Column("rollouts_to_target", "rollouts to target ↓", "min", fmt_count, _estimate("rollouts_to_target"),
               censored=True),
    ]
    for rule in sorted({rule for g in groups for rule in g["rollouts_ratio"]}):
        columns.append(Column(f"rollouts_ratio_{rule}", f"rollouts ÷ {rule.replace('_', ' ')} (×) ↓", "min",
                              fmt_ratio, _ratio(rule), censored=True))
    # one rank correlation: against the true rate where the simulator knows it, else against s/k
    has_truth = any(g["estimates"]["spearman_true"].mean is not None for g in groups)
    spearman = "spearman_true" if has_truth else "spearman_empirical"
    columns += [
        Column("mean_effective_ratio", "effective ratio ↑", "max", fmt_rate, _estimate("mean_effective_ratio")),
        *[c for c in CALIBRATION_COLUMNS if c.key in ("log_predictive_density", "brier", "ece", spearman,
                                                      "auroc_informative")],
    ]
    unit, scale = time_unit([g["estimates"]["seconds_per_step"].mean for g in groups])
    columns.append(Column("seconds_per_step", f"wall time per step ({unit}) ↓", "min", fmt_seconds,
                          _scaled(_estimate("seconds_per_step"), scale)))
    if any(g["estimates"]["predictor_time_share"].mean is not None for g in groups):
        columns.append(Column("predictor_time_share", "predictor share of wall time ↓", "min", fmt_rate,
                              _estimate("predictor_time_share")))
    return columns


def _distance(column: Column, estimate: Estimate) -> tuple[float, float]:
    """Smaller is better: (share of seeds without a value, for censored columns; then the value)."""
    missing = 1.0 - estimate.n / estimate.total if column.censored and estimate.total else 0.0
    value = estimate.mean
    if column.better == "max":
        return missing, -value
    if column.better == "min":
        return missing, value
    return missing, abs(value - float(column.better))


def best_groups(groups: Sequence[dict[str, Any]], column: Column) -> list[str]:
    """Groups holding the best mean of the column (ties all count); none if fewer than two have one.

    Reference arms (a rule that selects with the true success rates) are not candidates.
    """
    if column.better is None:
        return []
    values = {g["group"]: column.pick(g) for g in groups if not g["reference"]}
    scored = {g: _distance(column, e) for g, e in values.items() if e is not None and e.mean is not None}
    if len(scored) < 2:
        return []
    top = min(scored.values())
    return [g for g, d in scored.items()
            if d[0] == top[0] and math.isclose(d[1], top[1], rel_tol=1e-9, abs_tol=1e-12)]


def _cell(column: Column, estimate: Estimate | None, best: bool) -> Cell:
    if estimate is None or estimate.mean is None:
        if column.key.startswith("rollouts") and estimate is not None:
            return Cell("not reached", note=f"0/{estimate.total} seeds")
        return Cell("—")
    interval = "" if estimate.lo == estimate.hi else f"[{column.fmt(estimate.lo)}, {column.fmt(estimate.hi)}]"
    note = f"{estimate.n}/{estimate.total} seeds" if estimate.n < estimate.total else ""
    return Cell(column.fmt(estimate.mean), interval, best, note)


def comparison_table(key: str, groups: Sequence[dict[str, Any]], columns: Sequence[Column],
                     caption: str) -> tuple[Table, dict[str, list[str]]]:
    """Rows: groups; a column with no value for any group is left out. Returns the best per column."""
    shown = [c for c in columns if any((e := c.pick(g)) is not None and e.mean is not None for g in groups)]
    best = {c.key: best_groups(groups, c) for c in shown}
    rows = []
    for group in groups:
        rule = Cell(group["acquisition"], note="reference: sees true p" if group["reference"] else "")
        cells = [Cell(group["predictor"]), rule, Cell(str(len(group["seeds"])))]
        cells += [_cell(c, c.pick(group), group["group"] in best[c.key]) for c in shown]
        rows.append(cells)
    table = Table(key, ["predictor", "acquisition rule", "seeds", *[c.label for c in shown]], rows, caption,
                  label_columns=3)
    return table, best


PAIRED_LABELS = {"rollouts_to_target": ("Δ rollouts to target", fmt_count),
                 "final_eval_accuracy": ("Δ final eval accuracy", fmt_rate),
                 "mean_effective_ratio": ("Δ effective ratio", fmt_rate)}


def paired_table(groups: Sequence[dict[str, Any]], baselines: Sequence[str]) -> Table:
    """Per group and baseline rule: mean over shared seeds of (this arm - the baseline arm)."""
    rows = []
    for group in groups:
        for rule in baselines:
            compared = group["paired_differences"].get(rule)
            if compared is None or compared["baseline"] == group["group"]:
                continue
            cells = [Cell(group["group"]), Cell(compared["baseline"])]
            for key in PAIRED_NUMBERS:
                label, fmt = PAIRED_LABELS[key]
                estimate = compared[key]
                if estimate.mean is None:
                    cells.append(Cell("—", note=f"0/{estimate.total} pairs"))
                    continue
                interval = "" if estimate.lo == estimate.hi else f"[{fmt(estimate.lo)}, {fmt(estimate.hi)}]"
                note = f"{estimate.n}/{estimate.total} pairs" if estimate.n < estimate.total else ""
                cells.append(Cell(("+" if estimate.mean > 0 else "") + fmt(estimate.mean), interval, note=note))
            rows.append(cells)
    columns = ["group", "against", *[PAIRED_LABELS[key][0] for key in PAIRED_NUMBERS]]
    return Table("paired", columns, rows,
                 "Paired differences with the baseline arms: the mean over seeds of (this arm − the baseline arm "
                 "run with the same seed, hence the same world, candidates and rollout noise stream), with its 95% "
                 "t-interval; an interval that excludes 0 is a difference the seeds agree on. Rollouts to target "
                 "pair only seeds where both arms reached the target.", label_columns=2)


def timing_table(groups: Sequence[dict[str, Any]], columns: Sequence[str]) -> Table:
    unit, scale = time_unit([e.mean for g in groups for e in g["time_per_step"].values()])
    rows = []
    for group in groups:
        cells = [Cell(group["group"])]
        for column in columns:
            e = group["time_per_step"].get(column)
            if e is None or e.mean is None:
                cells.append(Cell("—"))
                continue
            interval = "" if e.lo == e.hi else f"[{fmt_seconds(e.lo * scale)}, {fmt_seconds(e.hi * scale)}]"
            cells.append(Cell(fmt_seconds(e.mean * scale), interval))
        rows.append(cells)
    labels = ["group", *[f"{c.removesuffix('_seconds')} ({unit}/step)" for c in columns]]
    return Table("timing", labels, rows, f"Mean {unit} per step of each recorded timing (95% t-interval over "
                 "seeds); the loop's phases add up to the step, other timings may be parts of a phase.")


def runs_table(run_rows: Sequence[dict[str, Any]]) -> Table:
    def num(value, fmt) -> str:
        return "—" if value is None or (isinstance(value, float) and not math.isfinite(value)) else fmt(value)

    rows = []
    for r in run_rows:
        check = "matches" if not r["summary_json_mismatches"] else "differs: " + "; ".join(r["summary_json_mismatches"])
        if not r["has_recorded_summary"]:
            check = "no summary.json"
        rows.append([Cell(r["run"]), Cell(r["group"]), Cell(str(r["seed"])),
                     Cell(num(r["final_eval_accuracy"], fmt_rate)),
                     Cell(num(r["rollouts_to_target"], fmt_count)
                          if math.isfinite(r["rollouts_to_target"]) else "not reached"),
                     Cell(num(r["mean_effective_ratio"], fmt_rate)), Cell(num(r["total_rollouts"], fmt_count)),
                     Cell(num(r["wall_seconds"], fmt_seconds)), Cell(num(r["log_predictive_density"], fmt_score)),
                     Cell(num(r["brier"], fmt_score)), Cell(num(r["ece"], fmt_score)), Cell(check)])
    columns = ["run", "group", "seed", "final eval accuracy", "rollouts to target", "effective ratio",
               "total rollouts", "wall time (s)", "log pred. density", "Brier", "ECE", "run's summary.json"]
    return Table("runs", columns, rows, "Every run, recomputed from its trace.parquet and metrics.parquet.",
                 label_columns=3)


def frame_table(key: str, frame: pd.DataFrame, caption: str, index_label: str, digits: int = 3) -> Table:
    """A DataFrame as a table (index first), floats rounded."""
    rows = []
    for index, values in frame.iterrows():
        cells = [Cell(str(index))]
        for value in values:
            if isinstance(value, float):
                cells.append(Cell("—" if not math.isfinite(value) else f"{value:.{digits}f}"))
            else:
                cells.append(Cell(str(value)))
        rows.append(cells)
    return Table(key, [index_label, *map(str, frame.columns)], rows, caption)
