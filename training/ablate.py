"""Controlled ablations: the same loop and seeds, one predictor or one rule swapped per arm.

`ablate(config, out_dir)` runs every arm x grid point x seed (`mpts.training.sweep`) on an
executor (`local` processes or `ray`, `mpts.training.executors`) into
`out_dir/runs/<predictor>__<acquisition>[__<key=value>...]__seed<s>/`, then writes
`out_dir/runs.parquet` (one row per run, `grid.<key>` columns for the point) and `out_dir/table.md`:
mean and 95% t-interval over seeds per arm x grid point, then each one's paired differences with the
baseline arms (uniform, dynamic sampling) at the same grid point seed by seed, pooled by the
report's own code so `mpts ablate` and `mpts report` agree. A finished run is never redone and an
interrupted one resumed, so re-running the same command completes an ablation.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mpts.inference.schema import format_grid_value
from mpts.reports.measures import PAIRED_NUMBERS, RUN_NUMBERS, pool_groups
from mpts.reports.stats import Estimate
from mpts.training.acquisition import get_acquisition_class, reference_role
from mpts.training.atomic import atomic_file, write_bytes
from mpts.training.config import RunConfig
from mpts.training.executors import make_executor
from mpts.training.executors.work import read_summary
from mpts.training.run_dir import write_json
from mpts.training.sweep import expand_grid

GRID_PREFIX = "grid."

HEADLINE = [
    ("rollouts_to_target", "rollouts to target", "min"),
    ("final_eval_accuracy", "final eval acc", "max"),
    ("final_eval_accuracy_greedy", "final greedy acc", "max"),  # LM: both held-out accuracies
    ("final_eval_accuracy_sampled", "final sampled acc", "max"),
    ("mean_effective_ratio", "effective ratio", "max"),
    ("log_predictive_density", "log pred. density", "max"),
    ("ece", "ECE", "min"),
    ("spearman_true", "Spearman vs true p", "max"),
]


class RunsFailed(RuntimeError):
    """Some runs of an ablation raised; the finished ones are saved."""


def ablate(config: RunConfig, out_dir: Path | str, *, workers: int | None = None, executor: str = "local",
           address: str | None = None, show_progress: bool = True) -> pd.DataFrame:
    out = Path(out_dir)
    runs = expand_grid(config)  # a bad grid fails here, before any folder is made
    runner = make_executor(executor, workers=workers or config.ablation.workers, address=address)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    grid_keys = list(config.ablation.grid)
    summaries = {run.name: read_summary(out / "runs" / run.name) for run in runs}
    todo = [run for run in runs if summaries[run.name] is None]  # finished runs are not redone
    failures: dict[str, BaseException] = {}
    progress = _progress(show_progress)
    # a log file or a pipe gets no live bar: one line per finished run instead
    lines = show_progress and not progress.console.is_terminal
    started, done = time.perf_counter(), len(runs) - len(todo)
    with progress:
        task = progress.add_task(f"ablation {config.name} ({executor})", total=len(runs), completed=done)
        for name, outcome in runner.execute(todo, out / "runs"):
            if isinstance(outcome, BaseException):
                failures[name] = outcome
            else:
                summaries[name] = outcome.summary
            done += 1
            progress.update(task, advance=1, description=f"ablation {config.name} ({executor}): {name}")
            if lines:
                progress.console.print(f"[{done}/{len(runs)}] {name} {'FAILED' if name in failures else 'done'} "
                                       f"({time.perf_counter() - started:.0f} s)", highlight=False, markup=False)
    if failures:
        first = next(iter(failures.values()))
        raise RunsFailed(f"{len(failures)} of {len(runs)} runs failed (the others are saved; re-run to retry): "
                           + "; ".join(f"{name}: {error}" for name, error in failures.items())) from first
    results = [{"run": run.name, **summaries[run.name],
                **{GRID_PREFIX + key: format_grid_value(run.point[key]) if key in run.point else "" for key in grid_keys}}
               for run in runs]
    frame = pd.DataFrame(results)  # in the config's order: arms, then grid points, then seeds
    with atomic_file(out / "runs.parquet") as handle:
        frame.to_parquet(handle, index=False)
    table = aggregate(frame)
    write_bytes(out / "table.md", format_table(table).encode())
    write_json(out / "ablation.json", {"config": config.name, "grid": config.ablation.grid,
                                       "runs": [run.name for run in runs]})
    return table


def grid_columns(frame) -> list[str]:
    """The run table's grid-point columns (`grid.<dotted key>`)."""
    return [c for c in frame if c.startswith(GRID_PREFIX)]


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    disable=not enabled, transient=False)


def aggregate(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per arm: each HEADLINE number's seed mean, the half-width of its 95% t-interval and its
    count; then, per baseline rule, the paired differences with that baseline's arm
    (`vs_<rule>.<number>`, same columns). Pooled by the report's own code (`pool_groups`)."""
    grid = grid_columns(frame)
    records = frame.to_dict("records")
    points = [{c.removeprefix(GRID_PREFIX): record[c] for c in grid if record[c] != ""} for record in records]
    runs = [{**{key: math.nan for key in RUN_NUMBERS}, **{k: v for k, v in record.items() if not _missing(v)},
             "group": " · ".join([record["predictor"], record["acquisition"], *(f"{k}={v}" for k, v in point.items())]),
             "predictor_label": record["predictor"], "acquisition_label": record["acquisition"], "point": point,
             "reference": reference_role(get_acquisition_class(record["acquisition"])),
             "time_per_step": {}, "has_elbo": False, "has_draws": False, "run": record.get("run", "")}
            for record, point in zip(records, points)]
    by_run = {run["run"]: record for run, record in zip(runs, records)}
    rows = []
    for group in pool_groups(runs):
        first = by_run[group["runs"][0]]
        row: dict[str, Any] = {"predictor": group["predictor"], "acquisition": group["acquisition"],
                               **{c: first[c] for c in grid}, "seeds": len(group["seeds"])}
        for column, _, _ in HEADLINE:
            _put(row, column, group["estimates"][column])
        for rule, compared in group["paired_differences"].items():
            if compared["baseline"] != group["group"]:
                for column in PAIRED_NUMBERS:
                    _put(row, f"vs_{rule}.{column}", compared[column])
        rows.append(row)
    return pd.DataFrame(rows)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _put(row: dict[str, Any], column: str, estimate: Estimate) -> None:
    row[column] = math.nan if estimate.mean is None else estimate.mean
    row[f"{column}_ci"] = (estimate.hi - estimate.lo) / 2 if estimate.n > 1 else math.nan
    row[f"{column}_n"] = estimate.n


def _cell(row: pd.Series, column: str, digits: int, total: int, signed: bool = False) -> str:
    mean, half, n = row[column], row[f"{column}_ci"], row[f"{column}_n"]
    if not n or _missing(n):
        return "not reached" if column.endswith("rollouts_to_target") else "n/a"
    text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    text += f" ± {half:.{digits}f}" if np.isfinite(half) else ""
    return text + (f" ({int(n)}/{total})" if n < total else "")


def format_table(table: pd.DataFrame) -> str:
    """Markdown, one row per arm x grid point: mean ± 95% t-interval over seeds ('(m/n)' where only m
    of n seeds have a value); then the paired differences with each baseline arm at the same grid
    point (same seeds), where the ablation has one."""
    # columns no arm has a value for (e.g. greedy and sampled accuracy on the simulator) are left out
    present = [(c, label) for c, label, _ in HEADLINE if c in table and table[c].notna().any()]
    grid = grid_columns(table)
    arm = "| predictor | acquisition | " + "".join(f"{c.removeprefix(GRID_PREFIX)} | " for c in grid)
    rule_line = "|---|---|" + "---|" * len(grid)

    def arm_cells(row: pd.Series) -> str:  # '·': the grid key does not apply to this arm
        return f"| {row['predictor']} | {row['acquisition']} | " + "".join(f"{row[c] or '·'} | " for c in grid)

    lines = [arm + " | ".join(label for _, label in present) + " |", rule_line + "---|" * len(present)]
    for _, row in table.iterrows():
        cells = [_cell(row, column, 0 if column == "rollouts_to_target" else 3, row["seeds"])
                 for column, _ in present]
        lines.append(arm_cells(row) + " | ".join(cells) + " |")
    rules = sorted({c.split(".")[0].removeprefix("vs_") for c in table.columns if c.startswith("vs_")})
    for rule in rules:
        columns = [(f"vs_{rule}.{c}", label) for c, label, _ in HEADLINE if c in PAIRED_NUMBERS]
        lines += ["", f"Paired differences with {rule.replace('_', ' ')} (this arm − that arm, same seed; "
                  "mean ± 95% t-interval over seeds):", "",
                  arm + " | ".join(f"Δ {label}" for _, label in columns) + " |", rule_line + "---|" * len(columns)]
        for _, row in table.iterrows():
            if all(_missing(row.get(f"{c}_n")) for c, _ in columns):
                continue
            cells = [_cell(row, c, 0 if c.endswith("rollouts_to_target") else 3, row["seeds"], signed=True)
                     for c, _ in columns]
            lines.append(arm_cells(row) + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
