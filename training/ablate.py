"""Controlled ablations: the same loop and seeds, one predictor or one rule swapped per arm.

`ablate(config, out_dir)` runs every (arm, seed) in parallel processes into
`out_dir/runs/<predictor>__<acquisition>__seed<s>/`, then writes `out_dir/runs.parquet` (one row
per run) and `out_dir/table.md` (mean and 95% t-interval over seeds). A run already finished is
reused and an interrupted one resumed, so re-running the same command completes an ablation.
"""

from __future__ import annotations

import concurrent.futures as futures
import multiprocessing
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from mpts.training.config import RunConfig, validate_config
from mpts.training.run_dir import write_json

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


def _component(value: str | dict[str, Any]) -> dict[str, Any]:
    return {"name": value} if isinstance(value, str) else dict(value)


def _options_slug(component: dict[str, Any]) -> str:
    return "".join(f"-{key}{value}" for key, value in sorted(component.items()) if key != "name")


def expand_runs(config: RunConfig) -> list[tuple[str, RunConfig]]:
    """(folder name, config) for every arm x seed. Arms that share a (predictor, rule) pair and
    differ in options (thompson_target at two targets) get those options in their names."""
    base = config.model_dump(mode="json")
    arms = config.ablation.arms or [None]
    pairs = [(_component(a.predictor)["name"], _component(a.acquisition)["name"]) for a in arms if a is not None]
    runs = []
    for arm in arms:
        raw = dict(base)
        if arm is not None:
            raw["predictor"] = _component(arm.predictor)
            raw["acquisition"] = _component(arm.acquisition)
        predictor, acquisition = raw["predictor"]["name"], raw["acquisition"]["name"]
        if pairs.count((predictor, acquisition)) > 1:
            predictor += _options_slug(raw["predictor"])
            acquisition += _options_slug(raw["acquisition"])
        for seed in config.ablation.seeds:
            cfg = validate_config({**raw, "seed": seed})
            runs.append((f"{predictor}__{acquisition}__seed{seed}", cfg))
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
    frame = pd.DataFrame(results)
    # the arm as named in its folder: differs from (predictor, acquisition) where options tell arms apart
    frame[["predictor", "acquisition"]] = frame["run"].str.rsplit("__seed", n=1).str[0].str.split("__", n=1).tolist()
    frame = frame.sort_values(["predictor", "acquisition", "seed"]).reset_index(drop=True)
    frame.to_parquet(out / "runs.parquet", index=False)
    table = aggregate(frame)
    (out / "table.md").write_text(format_table(table))
    write_json(out / "ablation.json", {"config": config.name, "runs": [name for name, _ in runs]})
    return table


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
    for (predictor, acquisition), group in frame.groupby(["predictor", "acquisition"], sort=False):
        row: dict[str, Any] = {"predictor": predictor, "acquisition": acquisition, "seeds": len(group)}
        for column, _, _ in HEADLINE:
            if column in group:
                mean, half, n = mean_ci(group[column])
                row[column], row[f"{column}_ci"], row[f"{column}_n"] = mean, half, n
        rows.append(row)
    return pd.DataFrame(rows)


def format_table(table: pd.DataFrame) -> str:
    """Markdown: mean ± 95% CI over seeds; '(m/n)' where only m of n seeds have a value."""
    present = [(c, label) for c, label, _ in HEADLINE if c in table]
    lines = ["| predictor | acquisition | " + " | ".join(label for _, label in present) + " |",
             "|---|---|" + "---|" * len(present)]
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
        lines.append(f"| {row['predictor']} | {row['acquisition']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
