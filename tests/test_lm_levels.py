"""scripts/lm_levels.py: the waste and the frontier of an LM run, by level, from its run folder."""

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest

from mpts.training.config import load_config
from mpts.training.environments.lm.env import LMEnvironment
from mpts.training.loop import run

TINY = {"hidden_size": 64, "num_layers": 1, "num_heads": 1, "num_kv_heads": 1, "intermediate_size": 128}
SMALL = ["steps=4", "batch_size=8", "candidate_ratio=2", "k=4", "eval_every=2", "checkpoint_every=2",
         "posterior_draws_prompts=8", "env.num_prompts=40", "env.eval_prompts=16", "env.warmup_sft_steps=10",
         "env.warmup_sft_problems=64", "env.warmup_cache=null", f"env.tiny={json.dumps(TINY)}"]


def load_script():
    path = Path(__file__).resolve().parent.parent / "scripts" / "lm_levels.py"
    spec = importlib.util.spec_from_file_location("lm_levels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Stop(Exception):
    pass


def test_lm_levels_reports_waste_levels_and_evals_of_a_finished_and_of_a_running_run(tmp_path, capsys):
    script = load_script()
    config = load_config("lm_mixed", SMALL)
    run(config, tmp_path / "done")
    assert script.main([str(tmp_path / "done"), "--window", "2"]) == 0
    out = capsys.readouterr().out
    metrics = pd.read_parquet(tmp_path / "done" / "metrics.parquet")
    assert f"mean effective ratio over steps 0-3: {metrics['effective_ratio'].mean():.3f}" in out
    # the levels are the pool's clusters, as the predictors see them
    options = config.env.model_dump()
    options.pop("name")
    env = LMEnvironment(LMEnvironment.Options.model_validate(options), seed=config.seed, run_dir=tmp_path / "env")
    clusters = env.pool.clusters
    env.close()
    assert script.pool_levels(config) == clusters.tolist()
    trace = pd.read_parquet(tmp_path / "done" / "trace.parquet")
    trace = trace[trace["step"] < 2].assign(level=lambda t: clusters[t["prompt_id"].tolist()].tolist())
    table = [line for line in out.splitlines() if line.startswith("| 0-1 |")][0].split(" | ")
    header = [line for line in out.splitlines() if line.startswith("| steps |")][0].split(" | ")
    for level, group in trace.groupby("level"):
        solve = (group["successes"] / group["trials"]).mean()
        assert table[header.index(f"L{level} solve")] == f"{solve:.3f}"
    assert "eval_accuracy_sampled_se" in out and "eval_accuracy_sampled_level1" in out  # lm_mixed evaluates by level
    summary = json.loads((tmp_path / "done" / "summary.json").read_text())
    start = [line for line in out.splitlines() if line.startswith("| -1 | 0 |")][0]  # the evaluation before step 0
    assert f"| {summary['initial_eval_accuracy_sampled_se']:.3f} |" in start

    with pytest.raises(Stop):
        run(config, tmp_path / "running", progress=lambda done, total, m: (_ for _ in ()).throw(Stop) if done == 3 else None)
    assert script.main([str(tmp_path / "running"), "--window", "2"]) == 0
    assert "mean effective ratio over steps 0-1:" in capsys.readouterr().out  # the parts flushed at step 2

    assert script.pool_levels(config, "digits") == [level + 1 for level in clusters.tolist()]  # level: digits
    pairs = script.pool_levels(config, "digits,carries")
    assert all(pair.split("/")[0] == str(d) for pair, d in zip(pairs, script.pool_levels(config, "digits")))
    assert {pair.split("/")[1] for pair in pairs} == {str(c) for c in script.pool_levels(config, "carries")}
    assert script.main([str(tmp_path / "done"), "--by", "nope"]) == 2
    assert "no such meta field" in capsys.readouterr().err
    assert script.main([str(tmp_path / "nowhere")]) == 2
    assert "is not a run folder" in capsys.readouterr().err


def test_checks_average_the_effective_ratio_over_steps_and_find_the_level_that_moved():
    script = load_script()
    metrics = pd.DataFrame({"step": [0, 1, 2], "effective_ratio": [0.2, 0.2, 0.8]})
    trace = pd.DataFrame({"step": [0, 0, 2, 2], "level": [0, 1, 0, 1], "successes": [0, 8, 4, 8], "trials": [8] * 4})
    lines = script.checks(trace, metrics, pd.DataFrame(), window=1)
    assert lines[0] == "- mean effective ratio over steps 0-2: 0.400 (<= 0.5)"
    assert lines[1].startswith("- level 0: solve rate 0.000 -> 0.500") and "starts unsolved, ends partly solved" in lines[1]
    assert lines[2].startswith("- level 1: solve rate 1.000 -> 1.000") and "starts unsolved" not in lines[2]
