"""Controlled ablations: the same loop and seeds, one predictor or one rule swapped per arm.

`ablate(config, out_dir)` runs every arm x grid point x seed (`mpts.training.sweep`) on an
executor (`local` processes or `ray`, `mpts.training.executors`) into
`out_dir/runs/<predictor>__<acquisition>[__<key=value>...]__seed<s>/`, then writes
`out_dir/runs.parquet` (one row per run, `grid.<key>` columns for the point) and `out_dir/table.md`
(mean and 95% t-interval over seeds, one row per arm x grid point). A finished run is never redone
and an interrupted one resumed, so re-running the same command completes an ablation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from mpts.training.config import RunConfig
from mpts.training.executors import make_executor
from mpts.training.executors.work import read_summary
from mpts.training.run_dir import write_json
from mpts.training.sweep import expand_grid, format_value

GRID_PREFIX = "grid."

HEADLINE = [
    ("rollouts_to_target", "rollouts to target", "min"),
    ("final_eval_accuracy", "final eval acc", "max"),
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
    with progress:
        task = progress.add_task(f"ablation {config.name} ({executor})", total=len(runs), completed=len(runs) - len(todo))
        for name, outcome in runner.execute(todo, out / "runs"):
            if isinstance(outcome, BaseException):
                failures[name] = outcome
            else:
                summaries[name] = outcome.summary
            progress.update(task, advance=1, description=f"ablation {config.name} ({executor}): {name}")
    if failures:
        first = next(iter(failures.values()))
        raise RunsFailed(f"{len(failures)} of {len(runs)} runs failed (the others are saved; re-run to retry): "
                           + "; ".join(f"{name}: {error}" for name, error in failures.items())) from first
    results = [{"run": run.name, **summaries[run.name],
                **{GRID_PREFIX + key: format_value(run.point[key]) if key in run.point else "" for key in grid_keys}}
               for run in runs]
    frame = pd.DataFrame(results)  # in the config's order: arms, then grid points, then seeds
    frame.to_parquet(out / "runs.parquet", index=False)
    table = aggregate(frame)
    (out / "table.md").write_text(format_table(table))
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


def mean_ci(values: pd.Series) -> tuple[float, float, int]:
    """Mean and half-width of the 95% t-interval over the finite values; count of them."""
    finite = values[np.isfinite(values.astype(float))].astype(float)
    n = len(finite)
    if n == 0:
        return float("nan"), float("nan"), 0
    if n == 1:
        return float(finite.iloc[0]), float("nan"), 1
    half = stats.t.ppf(0.975, n - 1) * finite.std(ddof=1) / np.sqrt(n)
    return float(finite.mean()), float(half), n


def aggregate(frame: pd.DataFrame) -> pd.DataFrame:
    rows = []
    keys = ["predictor", "acquisition", *grid_columns(frame)]
    for values, group in frame.groupby(keys, sort=False, dropna=False):
        row: dict[str, Any] = {**dict(zip(keys, values)), "seeds": len(group)}
        for column, _, _ in HEADLINE:
            if column in group:
                mean, half, n = mean_ci(group[column])
                row[column], row[f"{column}_ci"], row[f"{column}_n"] = mean, half, n
        rows.append(row)
    return pd.DataFrame(rows)


def format_table(table: pd.DataFrame) -> str:
    """Markdown: mean ± 95% CI over seeds; '(m/n)' where only m of n seeds have a value."""
    present = [(c, label) for c, label, _ in HEADLINE if c in table]
    grid = grid_columns(table)
    lines = ["| predictor | acquisition | " + "".join(f"{c.removeprefix(GRID_PREFIX)} | " for c in grid)
             + " | ".join(label for _, label in present) + " |",
             "|---|---|" + "---|" * (len(grid) + len(present))]
    for _, row in table.iterrows():
        cells = []
        for column, _ in present:
            mean, half, n = row[column], row[f"{column}_ci"], row[f"{column}_n"]
            if n == 0:
                cells.append("not reached" if column == "rollouts_to_target" else "n/a")
                continue
            digits = 0 if column == "rollouts_to_target" else 3
            text = f"{mean:.{digits}f}" + (f" ± {half:.{digits}f}" if np.isfinite(half) else "")
            if n < row["seeds"]:
                text += f" ({n}/{row['seeds']})"
            cells.append(text)
        point = "".join(f"{row[c] or '·'} | " for c in grid)  # '·': the key does not apply to this arm
        lines.append(f"| {row['predictor']} | {row['acquisition']} | {point}" + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
