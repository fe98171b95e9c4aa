"""scripts/selection_diagnostics.py: per-level Spearman, repeats per prompt, where each arm found signal."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_runs import write_run  # noqa: E402

from mpts.inference.schema import LEVELS_FILE  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "selection_diagnostics.py"


def _module():
    spec = importlib.util.spec_from_file_location("selection_diagnostics", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_diagnostics_pool_seeds_per_arm_and_count_repeats(tmp_path, capsys):
    diagnostics = _module()
    for seed in (0, 1):
        run = write_run(tmp_path / "abl" / "runs" / f"beta__uniform__seed{seed}", predictor="beta",
                        acquisition="uniform", seed=seed, steps=10, pool_size=300)
        (run / LEVELS_FILE).write_text(json.dumps({"levels": [i % 2 for i in range(300)]}))
    assert diagnostics.main([str(tmp_path / "abl")]) == 0
    out = capsys.readouterr().out
    assert "beta__uniform" in out and "Spearman L0" in out and "Spearman L1" in out
    traces = [pd.read_parquet(tmp_path / "abl" / "runs" / f"beta__uniform__seed{s}" / "trace.parquet") for s in (0, 1)]
    traces = [t[~t["failed"]] for t in traces]
    row = diagnostics.arm_table([t.assign(level=t["prompt_id"] % 2) for t in traces])
    rolled, distinct = sum(len(t) for t in traces), sum(t["prompt_id"].nunique() for t in traces)
    assert row["rollouts per distinct prompt"] == pytest.approx(rolled / distinct)
    assert row["share on a prompt seen before"] == pytest.approx((rolled - distinct) / rolled)
    assert row["seeds"] == 2 and -1 <= row["Spearman L0"] <= 1


def test_runs_without_levels_are_refused(tmp_path, capsys):
    write_run(tmp_path / "abl" / "runs" / "beta__uniform__seed0", predictor="beta", acquisition="uniform", seed=0,
              steps=4)
    assert _module().main([str(tmp_path / "abl")]) == 2
    assert "prompt_levels.json" in capsys.readouterr().err


def test_frontier_counts_the_levels_informative_groups_per_step_and_the_step_it_reached_half(tmp_path, capsys):
    diagnostics = _module()
    run = write_run(tmp_path / "abl" / "runs" / "beta__uniform__seed0", predictor="beta", acquisition="uniform",
                    seed=0, steps=10, pool_size=300)
    (run / LEVELS_FILE).write_text(json.dumps({"levels": [i % 2 for i in range(300)]}))
    # held-out greedy accuracy on level 1 by step: below 0.5 until step 6, whatever level 0 does
    metrics = pd.read_parquet(run / "metrics.parquet")
    before = metrics.iloc[:1].assign(step=-1)  # the LM loop's evaluation before the first step
    metrics = pd.concat([before, metrics], ignore_index=True)
    metrics["eval_accuracy_greedy_level1"] = [0.9 if s == -1 else (0.6 if s >= 6 else 0.2) for s in metrics["step"]]
    metrics["eval_accuracy_greedy_level0"] = 1.0
    metrics.to_parquet(run / "metrics.parquet")
    trace = pd.read_parquet(run / "trace.parquet")
    trace = trace[~trace["failed"]].assign(level=lambda t: t["prompt_id"] % 2, run=run.name)
    row = diagnostics.frontier_columns(tmp_path / "abl", [trace], 1)
    level1 = trace[trace["level"] == 1]
    informative = ((level1["successes"] > 0) & (level1["successes"] < level1["trials"])).sum()
    assert row["informative L1 groups per step"] == pytest.approx(informative / 10)
    assert row["steps to held-out L1 greedy >= 0.5"] == 6  # the evaluation before step 0 does not count
    assert row["seeds reaching it"] == "1/1"
    assert diagnostics.main([str(tmp_path / "abl"), "--frontier", "1"]) == 0
    assert "steps to held-out L1 greedy" in capsys.readouterr().out
    metrics.drop(columns=["eval_accuracy_greedy_level1"]).to_parquet(run / "metrics.parquet")
    assert diagnostics.main([str(tmp_path / "abl"), "--frontier", "1"]) == 2  # no per-level evaluations: one line
    assert "eval_accuracy_greedy_level1" in capsys.readouterr().err
