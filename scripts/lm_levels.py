"""Where an LM run's rollouts carried signal, by difficulty level: the waste and the frontier of a run.

Reads a run folder of the LM environment (finished, or still running: then the parts flushed at its
checkpoints) and prints markdown tables:

- by window of steps: the effective ratio (share of groups with 0 < successes < k) and, per level
  (the pool's clusters, rebuilt from the run's config), the mean solve rate and the shares of groups
  solved by none or all of their k rollouts; the frontier is the level whose solve rate moves;
- at each evaluation: held-out greedy and sampled accuracy with their standard errors, and per level
  when the run had `env.eval_by_level`;
- the checks of issue 17 for a uniform run: mean effective ratio <= 0.5, held-out accuracy rising
  over the first half, and a level that starts unsolved (mean solve rate < 0.1 in the first window)
  and ends partly solved (>= 0.2 in the last).

    .venv/bin/python scripts/lm_levels.py runs/lm_mixed-probe-0 [--window 10] [--by carries]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pandas as pd

from mpts.training.config import load_config
from mpts.training.environments.lm.env import split_problems
from mpts.training.environments.lm.tasks import get_task
from mpts.training.run_dir import RunFolder

UNSOLVED, PARTLY = 0.1, 0.2  # a level's mean solve rate: "starts unsolved" below, "ends partly solved" at or above


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="an LM run folder (runs/...)")
    parser.add_argument("--window", type=int, default=10, help="steps per row of the by-level table")
    parser.add_argument("--by", metavar="KEY", help="group the pool rollouts by this field of the problems' meta "
                        "(arithmetic: digits, carries, op; comma-separated for combinations) instead of the level")
    args = parser.parse_args(argv)
    if args.window < 1:
        parser.error(f"--window must be >= 1, got {args.window}")
    if not (args.run / "config.yaml").is_file():
        print(f"lm_levels: {args.run} is not a run folder (no config.yaml)", file=sys.stderr)
        return 2
    config = load_config(args.run / "config.yaml")
    if config.env.name != "lm":
        print(f"lm_levels: {args.run} is a {config.env.name!r} run, not an LM one", file=sys.stderr)
        return 2
    trace, metrics = read_tables(args.run)
    if trace.empty:
        print(f"lm_levels: {args.run} has no steps recorded yet (rows are flushed at checkpoints)", file=sys.stderr)
        return 2
    try:
        levels = pool_levels(config, args.by)
    except KeyError:
        print(f"lm_levels: --by {args.by}: the task's problems have no such meta field", file=sys.stderr)
        return 2
    trace = trace[~trace["failed"]].assign(level=lambda t: [levels[i] for i in t["prompt_id"]])
    print(f"## {args.run} (steps {int(trace['step'].min())}-{int(trace['step'].max())}, k = {config.k})\n")
    by_window = window_table(trace, metrics, args.window)
    print(markdown(by_window), "\n")
    evals = eval_table(metrics, read_initial_evals(args.run))
    if not evals.empty:
        print(markdown(evals), "\n")
    print("\n".join(checks(trace, metrics, evals, args.window)))
    return 0


def pool_levels(config, by: str | None = None) -> list:
    """Each pool prompt's level (its cluster), or its meta field `by`, rebuilt from the run's config
    without the model."""
    env = config.env.model_dump()
    pool, _ = split_problems(get_task(env["task"], env["task_options"]), env["num_prompts"], env["eval_prompts"],
                             config.seed)
    if by is None:
        return [p.difficulty for p in pool]
    keys = by.split(",")  # several fields: one group per combination, e.g. digits,carries -> "2/1"
    return [p.meta[keys[0]] if len(keys) == 1 else "/".join(str(p.meta[k]) for k in keys) for p in pool]


def markdown(frame: pd.DataFrame) -> str:
    """A pipe table, numbers to three decimals (integers as they are)."""
    def cell(value) -> str:
        if isinstance(value, float):
            return "" if math.isnan(value) else f"{value:.3f}"
        return str(value)
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def read_tables(run: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The final tables, or the verified parts of a run still going."""
    if (run / "trace.parquet").is_file() and (run / "metrics.parquet").is_file():
        return pd.read_parquet(run / "trace.parquet"), pd.read_parquet(run / "metrics.parquet")
    folder = RunFolder(run)
    return folder.read_parts("trace"), folder.read_parts("metrics")


def group_stats(rows: pd.DataFrame) -> dict[str, float]:
    rate = rows["successes"] / rows["trials"]
    return {"solve": float(rate.mean()), "none": float((rows["successes"] == 0).mean()),
            "all": float((rows["successes"] == rows["trials"]).mean())}


def window_table(trace: pd.DataFrame, metrics: pd.DataFrame, window: int) -> pd.DataFrame:
    """One row per window of steps: effective ratio, then per level solve rate / share 0 of k / share k of k."""
    rows = []
    for start in range(int(trace["step"].min()), int(trace["step"].max()) + 1, window):
        steps = trace[(trace["step"] >= start) & (trace["step"] < start + window)]
        in_window = metrics[(metrics["step"] >= start) & (metrics["step"] < start + window)]
        row = {"steps": f"{start}-{int(steps['step'].max())}", "effective ratio": float(in_window["effective_ratio"].mean())}
        for level, group in steps.groupby("level"):
            stats = group_stats(group)
            row[f"L{level} solve"] = stats["solve"]
            row[f"L{level} 0/k|k/k"] = f"{stats['none']:.2f}|{stats['all']:.2f}"
        rows.append(row)
    return pd.DataFrame(rows)


def read_initial_evals(run: Path) -> dict[str, float]:
    """The evaluation before the first step (a finished run's summary.json; {} while it runs)."""
    try:
        summary = json.loads((run / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    return {key.removeprefix("initial_"): value for key, value in summary.items()
            if key.startswith("initial_eval_accuracy_") and value is not None}


def eval_table(metrics: pd.DataFrame, initial: dict[str, float] | None = None) -> pd.DataFrame:
    """Held-out accuracies at the evaluation steps (step -1: before the first), with standard errors
    and per level when recorded."""
    if "eval_accuracy_greedy" not in metrics:
        return pd.DataFrame()
    evaluated = metrics[metrics["eval_accuracy_greedy"].notna()]
    columns = ["step", "cumulative_rollouts"] + [c for c in evaluated.columns if c.startswith("eval_accuracy_")]
    table = evaluated[columns]
    if initial:
        start = pd.DataFrame([{"step": -1, "cumulative_rollouts": 0, **{c: initial.get(c, math.nan) for c in columns[2:]}}])
        table = pd.concat([start, table])
    return table.reset_index(drop=True)


def checks(trace: pd.DataFrame, metrics: pd.DataFrame, evals: pd.DataFrame, window: int) -> list[str]:
    out = []
    mean_ratio = float(metrics["effective_ratio"].mean())
    out.append(f"- mean effective ratio over steps {int(metrics['step'].min())}-{int(metrics['step'].max())}: "
               f"{mean_ratio:.3f} ({'<=' if mean_ratio <= 0.5 else '>'} 0.5)")
    if not evals.empty:
        half = evals[evals["step"] < (metrics["step"].max() + 1) / 2]
        for kind in ("greedy", "sampled"):
            column = f"eval_accuracy_{kind}"
            if column not in half or len(half) < 2:
                continue
            first, last = half.iloc[0], half.iloc[-1]
            se = math.hypot(first.get(f"{column}_se", 0.0), last.get(f"{column}_se", 0.0))
            out.append(f"- held-out {kind}, first half: step {int(first['step'])} {first[column]:.3f} -> "
                       f"step {int(last['step'])} {last[column]:.3f} (difference {last[column] - first[column]:+.3f}, "
                       f"standard error of the difference about {se:.3f}, unpaired)")
    first_steps = trace[trace["step"] < trace["step"].min() + window]
    last_steps = trace[trace["step"] > trace["step"].max() - window]
    for level in sorted(trace["level"].unique()):
        start, end = group_stats(first_steps[first_steps["level"] == level]), group_stats(last_steps[last_steps["level"] == level])
        moved = start["solve"] < UNSOLVED and end["solve"] >= PARTLY
        out.append(f"- level {level}: solve rate {start['solve']:.3f} -> {end['solve']:.3f} (first vs last {window} "
                   f"steps){'  <- starts unsolved, ends partly solved' if moved else ''}")
    return out


if __name__ == "__main__":
    sys.exit(main())
