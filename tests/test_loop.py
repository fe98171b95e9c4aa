"""The common loop on the simulated learner: run folders, determinism, resume, every rule."""

import json

import numpy as np
import pandas as pd
import pytest

from mpts.training.acquisition import RULES, sample_candidates
from mpts.training.config import ConfigError, load_config
from mpts.training.loop import run
from mpts.training.run_dir import METRICS_REQUIRED, TRACE_SCHEMA
from mpts.training.selector import RandomStreams

SMALL = ["steps=12", "batch_size=16", "candidate_ratio=4", "env.num_prompts=300", "env.eval_prompts=100",
         "checkpoint_every=5", "posterior_draws_prompts=40"]


def small(*extra):
    return load_config("quickstart", SMALL + list(extra))


def test_run_writes_the_documented_folder(tmp_path):
    summary = run(small(), tmp_path / "r")
    folder = tmp_path / "r"
    for name in ("config.yaml", "trace.parquet", "metrics.parquet", "summary.json", "posterior_draws.parquet",
                 "progress.json", "checkpoints/latest.pt", "checkpoints/predictor_final.pt"):
        assert (folder / name).exists(), name
    trace = pd.read_parquet(folder / "trace.parquet")
    assert list(trace.columns) == TRACE_SCHEMA.names
    assert len(trace) == 12 * 16 and trace["true_p"].notna().all()
    assert (trace["successes"] <= trace["trials"]).all() and (trace["trials"] == 8).all()
    metrics = pd.read_parquet(folder / "metrics.parquet")
    assert set(METRICS_REQUIRED) <= set(metrics.columns)
    assert metrics["step"].tolist() == list(range(12))
    assert metrics["cumulative_rollouts"].iloc[-1] == 12 * 16 * 8 == summary["total_rollouts"]
    informative = ((trace.successes > 0) & (trace.successes < trace.trials)).groupby(trace.step).mean()
    assert np.allclose(metrics["effective_ratio"], informative.to_numpy())
    assert json.loads((folder / "summary.json").read_text())["predictor"] == "beta"
    assert json.loads((folder / "progress.json").read_text())["status"] == "done"


def test_same_seed_same_run_other_seed_other_run(tmp_path):
    a = pd.read_parquet(run(small(), tmp_path / "a") and tmp_path / "a" / "trace.parquet")
    b = pd.read_parquet(run(small(), tmp_path / "b") and tmp_path / "b" / "trace.parquet")
    c = pd.read_parquet(run(small("seed=5"), tmp_path / "c") and tmp_path / "c" / "trace.parquet")
    pd.testing.assert_frame_equal(a, b)
    assert not a["prompt_id"].equals(c["prompt_id"])


class Interrupt(Exception):
    pass


def test_resume_after_a_crash_loses_and_duplicates_no_rows(tmp_path):
    config = small("steps=17")
    reference = run(config, tmp_path / "whole")

    def crash_at_13(done, total, metrics):
        if done == 13:
            raise Interrupt
    with pytest.raises(Interrupt):
        run(config, tmp_path / "split", progress=crash_at_13)
    resumed = run(None, tmp_path / "split", resume=True)
    whole = pd.read_parquet(tmp_path / "whole" / "trace.parquet")
    split = pd.read_parquet(tmp_path / "split" / "trace.parquet")
    pd.testing.assert_frame_equal(whole, split)
    columns = ["step", "rollouts", "cumulative_rollouts", "eval_accuracy", "effective_ratio"]
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "whole" / "metrics.parquet")[columns],
                                  pd.read_parquet(tmp_path / "split" / "metrics.parquet")[columns])
    assert resumed["final_eval_accuracy"] == reference["final_eval_accuracy"]


@pytest.mark.parametrize("rule", RULES.names())
def test_every_rule_drives_the_loop(tmp_path, rule):
    summary = run(small("steps=4", f"acquisition={{name: {rule}}}"), tmp_path / rule)
    trace = pd.read_parquet(tmp_path / rule / "trace.parquet")
    assert (trace["selected_by"] == rule).all()
    assert summary["acquisition"] == rule
    per_step = trace.groupby("step")
    assert (per_step["kept"].sum() <= 16).all()
    if rule != "dynamic_sampling":
        assert (per_step.size() == 16).all()


def test_dynamic_sampling_pays_for_every_rollout_and_keeps_only_informative(tmp_path):
    run(small("steps=6", "acquisition={name: dynamic_sampling}"), tmp_path / "ds")
    trace = pd.read_parquet(tmp_path / "ds" / "trace.parquet")
    metrics = pd.read_parquet(tmp_path / "ds" / "metrics.parquet")
    kept = trace[trace.kept]
    assert ((kept.successes > 0) & (kept.successes < kept.trials)).all()
    assert (metrics["rollouts"].to_numpy() == trace.groupby("step")["trials"].sum().to_numpy()).all()
    assert (metrics["rollouts"] >= 16 * 8).all()


def test_beta_recovers_true_success_rates_of_a_stationary_learner(tmp_path):
    config = small("steps=120", "batch_size=40", "candidate_ratio=2", "env.num_prompts=80",
                   "env.learning_rate=0", "env.transfer=0", "predictor.decay=1.0",
                   "acquisition={name: uniform}", "checkpoint_every=200")
    run(config, tmp_path / "rec")
    draws = pd.read_parquet(tmp_path / "rec" / "posterior_draws.parquet")
    per_prompt = draws.groupby("prompt_id").agg(mean=("p", "mean"), truth=("true_p", "first"),
                                                lo=("p", lambda x: x.quantile(0.05)), hi=("p", lambda x: x.quantile(0.95)))
    assert (per_prompt["mean"] - per_prompt["truth"]).abs().mean() < 0.04
    covered = ((per_prompt.lo <= per_prompt.truth) & (per_prompt.truth <= per_prompt.hi)).mean()
    assert covered >= 0.75


def test_too_few_prompts_for_the_candidate_pool_is_an_error_and_leaves_no_folder(tmp_path):
    with pytest.raises(ValueError, match="candidate pool of 512 .* exceeds the 100 prompts"):
        run(load_config("quickstart", ["env.num_prompts=100"]), tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


def test_existing_run_folder_is_not_overwritten(tmp_path):
    run(small("steps=2"), tmp_path / "r")
    before = (tmp_path / "r" / "trace.parquet").read_bytes()
    with pytest.raises(FileExistsError, match="already holds a run"):
        run(small("steps=2"), tmp_path / "r")
    assert (tmp_path / "r" / "trace.parquet").read_bytes() == before


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    def stop(done, total, metrics):
        if done == 7:
            raise Interrupt
    with pytest.raises(Interrupt):
        run(small(), tmp_path / "r", progress=stop)
    (tmp_path / "r" / "checkpoints" / "latest.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="unreadable"):
        run(None, tmp_path / "r", resume=True)


def test_every_arm_chooses_from_the_candidates_of_the_seeds_candidate_stream(tmp_path):
    """Common random numbers: whatever an arm chose before, step t's candidates are the same draw."""
    streams = RandomStreams(0)
    candidates = [set(sample_candidates(300, 64, streams.generator("candidates", t)).tolist()) for t in range(12)]
    for rule in ("uniform", "top_informative", "thompson_target", "risk"):
        run(small(f"acquisition={{name: {rule}}}"), tmp_path / rule)
        trace = pd.read_parquet(tmp_path / rule / "trace.parquet")
        for step, rows in trace.groupby("step"):
            assert set(rows["prompt_id"]) <= candidates[step], (rule, step)


def test_a_rule_that_needs_truth_is_refused_when_the_config_is_read_for_an_environment_without_it():
    with pytest.raises(ConfigError, match="acquisition 'oracle' ranks on the true success probabilities, "
                                          "which environment 'lm' does not know"):
        load_config("lm_tiny", ["acquisition={name: oracle}"])
    load_config("quickstart", ["acquisition={name: oracle}"])  # the simulator knows p


def test_rollout_noise_follows_the_environment_stream_of_the_step_not_earlier_draws(tmp_path):
    """A learner that does not learn: uniform and dynamic sampling draw the same first chunk at every
    step (same candidates, same acquisition stream); with the per-step environment stream its
    outcomes match, however many extra chunks dynamic sampling rolled out at earlier steps."""
    frozen = ["env.learning_rate=0", "env.transfer=0", "steps=5"]
    run(small(*frozen, "acquisition={name: uniform}"), tmp_path / "u")
    run(small(*frozen, "acquisition={name: dynamic_sampling}"), tmp_path / "ds")
    uniform = pd.read_parquet(tmp_path / "u" / "trace.parquet")
    dynamic = pd.read_parquet(tmp_path / "ds" / "trace.parquet")
    assert (dynamic.groupby("step").size() > 16).any()  # dynamic sampling did spend extra chunks
    for step in range(5):
        first_chunk = dynamic[dynamic.step == step].head(16)
        same = uniform[uniform.step == step]
        assert first_chunk["prompt_id"].tolist() == same["prompt_id"].tolist()
        assert first_chunk["successes"].tolist() == same["successes"].tolist()
