"""Why a predictive arm does or does not beat uniform: per arm of an ablation, pooled over seeds.

For each arm (runs grouped by folder name less `__seed<N>`), printed as markdown:

- Spearman rank correlation of the prediction made before each rollout (`pred_mean`) with the
  outcome s/k, within each difficulty level (levels from the run folders' `prompt_levels.json`)
  and over all rows: a predictor that only knows the level ranks well overall and not within one;
- repeats: rolled-out prompts per distinct prompt, and the share of rollouts on a prompt the run
  had rolled out before;
- the share of groups with 0 < s < k per level (where the arm found signal);
- with `--frontier L`: how fast level L moved for the signal spent on it: informative groups of
  level L per step, and the first step at which held-out greedy accuracy on level L reached 0.5
  (from each run's metrics; mean over the seeds that reach it, and how many did).

    .venv/bin/python scripts/selection_diagnostics.py runs/lm_mixed-ablation7 --frontier 2
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pandas as pd
from scipy import stats

from mpts.reports.levels import read_levels

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lm_levels import markdown  # noqa: E402  (the scripts' one pipe-table writer; no tabulate needed)


def arm_rows(ablation: Path) -> dict[str, list[pd.DataFrame]]:
    """Finished runs' traces (with levels) grouped by arm."""
    arms: dict[str, list[pd.DataFrame]] = {}
    for run in sorted((ablation / "runs").iterdir()):
        if not (run / "summary.json").is_file():
            continue
        levels = read_levels(run)
        if levels is None:
            raise ValueError(f"{run} has no prompt_levels.json: these diagnostics need the pool's levels")
        trace = pd.read_parquet(run / "trace.parquet", columns=["step", "prompt_id", "successes", "trials",
                                                                 "pred_mean", "failed"])
        trace = trace[~trace["failed"]].assign(level=lambda t: levels[t["prompt_id"].to_numpy()], run=run.name)
        arms.setdefault(re.sub(r"__seed\d+$", "", run.name), []).append(trace)
    return arms


def spearman(rows: pd.DataFrame) -> float:
    rate = rows["successes"] / rows["trials"]
    if len(rows) < 3 or rate.nunique() < 2 or rows["pred_mean"].nunique() < 2:
        return float("nan")
    return float(stats.spearmanr(rows["pred_mean"], rate).statistic)


def arm_table(traces: list[pd.DataFrame]) -> dict[str, object]:
    rows = pd.concat(traces, ignore_index=True)
    row: dict[str, object] = {"seeds": len(traces), "Spearman all": spearman(rows)}
    for level, group in rows.groupby("level"):
        row[f"Spearman L{level}"] = spearman(group)
    per_run = [t.groupby("prompt_id").size() for t in traces]
    row["rollouts per distinct prompt"] = sum(c.sum() for c in per_run) / sum(len(c) for c in per_run)
    row["share on a prompt seen before"] = sum((c - 1).sum() for c in per_run) / sum(c.sum() for c in per_run)
    for level, group in rows.groupby("level"):
        informative = (group["successes"] > 0) & (group["successes"] < group["trials"])
        row[f"L{level} share of rollouts / informative"] = f"{len(group) / len(rows):.2f} / {informative.mean():.2f}"
    return row


FRONTIER_ACCURACY = 0.5  # "half the level solved greedily": a point every arm's curve passes in its steep phase


def frontier_columns(ablation: Path, traces: list[pd.DataFrame], level: int) -> dict[str, object]:
    """Informative groups of `level` per step and the steps until its held-out greedy accuracy
    reached FRONTIER_ACCURACY, over an arm's runs (one trace per run)."""
    column = f"eval_accuracy_greedy_level{level}"
    per_step, reached = [], []
    for trace in traces:
        run = ablation / "runs" / trace["run"].iloc[0]
        rows = trace[trace["level"] == level]
        informative = ((rows["successes"] > 0) & (rows["successes"] < rows["trials"])).sum()
        per_step.append(float(informative) / (int(trace["step"].max()) + 1))
        metrics = pd.read_parquet(run / "metrics.parquet")
        if column not in metrics:
            raise ValueError(f"{run / 'metrics.parquet'} has no {column} (held-out accuracy by level: env.eval_by_level)")
        evals = metrics[(metrics["step"] >= 0) & metrics[column].notna()]
        hit = evals.loc[evals[column] >= FRONTIER_ACCURACY, "step"]
        if len(hit):
            reached.append(int(hit.iloc[0]))
    return {f"informative L{level} groups per step": sum(per_step) / len(per_step),
            f"steps to held-out L{level} greedy >= {FRONTIER_ACCURACY}": sum(reached) / len(reached) if reached else float("nan"),
            "seeds reaching it": f"{len(reached)}/{len(traces)}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ablation", type=Path, help="an ablation folder (with runs/)")
    parser.add_argument("--frontier", type=int, metavar="LEVEL",
                        help="add how fast this level moved: its informative groups per step and steps to "
                             f"held-out greedy accuracy {FRONTIER_ACCURACY} on it")
    args = parser.parse_args(argv)
    if not (args.ablation / "runs").is_dir():
        print(f"selection_diagnostics: {args.ablation} has no runs/ folder", file=sys.stderr)
        return 2
    try:
        arms = arm_rows(args.ablation)
    except ValueError as error:
        print(f"selection_diagnostics: {error}", file=sys.stderr)
        return 2
    if not arms:
        print(f"selection_diagnostics: {args.ablation} has no finished runs", file=sys.stderr)
        return 2
    try:
        table = pd.DataFrame({arm: {**arm_table(traces),
                                    **(frontier_columns(args.ablation, traces, args.frontier)
                                       if args.frontier is not None else {})}
                              for arm, traces in arms.items()}).T
    except ValueError as error:
        print(f"selection_diagnostics: {error}", file=sys.stderr)
        return 2
    print(markdown(table.rename_axis("arm").reset_index()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
