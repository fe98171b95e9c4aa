"""Controlled ablations: the same loop and seeds, one predictor or one rule swapped per arm.

`ablate(config, out_dir)` runs every (arm, seed) in parallel processes into
`out_dir/runs/<predictor>__<acquisition>__seed<s>/`, then writes `out_dir/runs.parquet` (one row
per run) and `out_dir/table.md`: mean and 95% t-interval over seeds per arm, then each arm's paired
differences with the baseline arms (uniform, dynamic sampling) seed by seed, pooled by the report's
own code so `mpts ablate` and `mpts report` agree. A run already finished is reused and an
interrupted one resumed, so re-running the same command completes an ablation.
"""

from __future__ import annotations

import concurrent.futures as futures
import math
import multiprocessing
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mpts.reports.measures import PAIRED_NUMBERS, RUN_NUMBERS, pool_groups
from mpts.reports.stats import Estimate
from mpts.training.acquisition import get_acquisition_class, reference_role
from mpts.training.config import RunConfig, validate_config
from mpts.training.run_dir import write_json

HEADLINE = [
    ("rollouts_to_target", "rollouts to target", "min"),
    ("final_eval_accuracy", "final eval acc", "max"),
    ("mean_effective_ratio", "effective ratio", "max"),
    ("log_predictive_density", "log pred. density", "max"),
    ("ece", "ECE", "min"),
    ("spearman_true", "Spearman vs true p", "max"),
]


def _component(value: str | dict[str, Any]) -> dict[str, Any]:
    return {"name": value} if isinstance(value, str) else dict(value)


def expand_runs(config: RunConfig) -> list[tuple[str, RunConfig]]:
    """(folder name, config) for every arm x seed."""
    base = config.model_dump(mode="json")
    arms = config.ablation.arms or [None]
    runs = []
    for arm in arms:
        raw = dict(base)
        if arm is not None:
            raw["predictor"] = _component(arm.predictor)
            raw["acquisition"] = _component(arm.acquisition)
        for seed in config.ablation.seeds:
            cfg = validate_config({**raw, "seed": seed})
            runs.append((f"{cfg.predictor.name}__{cfg.acquisition.name}__seed{seed}", cfg))
    names = [name for name, _ in runs]
    if len(set(names)) != len(names):
        raise ValueError("ablation arms repeat a (predictor, acquisition) pair; each arm must differ")
    return runs


def _run_one(name: str, config_json: dict[str, Any], run_dir: str) -> dict[str, Any]:
    import torch

    from mpts.training.loop import run

    torch.set_num_threads(1)  # one process per core: threads inside would oversubscribe
    config = validate_config(config_json)
    folder = Path(run_dir)
    summary_path = folder / "summary.json"
    if summary_path.exists():
        import json
        return {"run": name, **json.loads(summary_path.read_text())}
    resume = (folder / "config.yaml").exists()
    return {"run": name, **run(config, folder, resume=resume)}


def ablate(config: RunConfig, out_dir: Path | str, *, workers: int | None = None, show_progress: bool = True) -> pd.DataFrame:
    out = Path(out_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    runs = expand_runs(config)
    workers = workers or config.ablation.workers
    results: list[dict[str, Any]] = []
    context = multiprocessing.get_context("spawn")
    progress = _progress(show_progress)
    with progress, futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        task = progress.add_task(f"ablation {config.name}", total=len(runs))
        pending = {pool.submit(_run_one, name, cfg.model_dump(mode="json"), str(out / "runs" / name)): name
                   for name, cfg in runs}
        for done in futures.as_completed(pending):
            results.append(done.result())
            progress.advance(task)
    frame = pd.DataFrame(results).sort_values(["predictor", "acquisition", "seed"]).reset_index(drop=True)
    frame.to_parquet(out / "runs.parquet", index=False)
    table = aggregate(frame)
    (out / "table.md").write_text(format_table(table))
    write_json(out / "ablation.json", {"config": config.name, "runs": [name for name, _ in runs]})
    return table


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    disable=not enabled, transient=False)


def aggregate(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per arm: each HEADLINE number's seed mean, the half-width of its 95% t-interval and its
    count; then, per baseline rule, the paired differences with that baseline's arm
    (`vs_<rule>.<number>`, same columns). Pooled by the report's own code (`pool_groups`)."""
    runs = [{**{key: math.nan for key in RUN_NUMBERS}, **{k: v for k, v in record.items() if not _missing(v)},
             "group": f"{record['predictor']} · {record['acquisition']}", "predictor_label": record["predictor"],
             "acquisition_label": record["acquisition"], "reference": reference_role(get_acquisition_class(record["acquisition"])),
             "time_per_step": {}, "has_elbo": False, "has_draws": False, "run": record.get("run", "")}
            for record in frame.to_dict("records")]
    rows = []
    for group in pool_groups(runs):
        row: dict[str, Any] = {"predictor": group["predictor"], "acquisition": group["acquisition"],
                               "seeds": len(group["seeds"])}
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
    """Markdown: mean ± 95% t-interval over seeds ('(m/n)' where only m of n seeds have a value); then
    the paired differences with each baseline arm (same seeds), where the ablation has one."""
    present = [(c, label) for c, label, _ in HEADLINE if c in table]
    lines = ["| predictor | acquisition | " + " | ".join(label for _, label in present) + " |",
             "|---|---|" + "---|" * len(present)]
    for _, row in table.iterrows():
        cells = [_cell(row, column, 0 if column == "rollouts_to_target" else 3, row["seeds"])
                 for column, _ in present]
        lines.append(f"| {row['predictor']} | {row['acquisition']} | " + " | ".join(cells) + " |")
    rules = sorted({c.split(".")[0].removeprefix("vs_") for c in table.columns if c.startswith("vs_")})
    for rule in rules:
        columns = [(f"vs_{rule}.{c}", label) for c, label, _ in HEADLINE if c in PAIRED_NUMBERS]
        lines += ["", f"Paired differences with {rule.replace('_', ' ')} (this arm − that arm, same seed; "
                  "mean ± 95% t-interval over seeds):", "",
                  "| predictor | acquisition | " + " | ".join(f"Δ {label}" for _, label in columns) + " |",
                  "|---|---|" + "---|" * len(columns)]
        for _, row in table.iterrows():
            if all(_missing(row.get(f"{c}_n")) for c, _ in columns):
                continue
            cells = [_cell(row, c, 0 if c.endswith("rollouts_to_target") else 3, row["seeds"], signed=True)
                     for c, _ in columns]
            lines.append(f"| {row['predictor']} | {row['acquisition']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
