"""The TRL adapter end to end on CPU: TRL 1.16's GRPOTrainer with a tiny Qwen2 built from a config.

One run with steps_per_generation = 4 and gradient accumulation = 2 (3 generations over 6
optimisation steps) is checked row by row against what the reward functions saw, against a
selector fed the same outcomes directly, and through `mpts report` / `mpts replay`; a resumed run
and a 2-process run (torchrun, gloo) are checked as well.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

pytest.importorskip("trl")

import trl_harness  # noqa: E402

from mpts.inference.scoring import run_summary  # noqa: E402
from mpts.models.registry import get_predictor_class  # noqa: E402
from mpts.training.acquisition import get_acquisition_class  # noqa: E402
from mpts.training.cli import main  # noqa: E402
from mpts.training.rewards import NoUsableRewardError, RewardWarning  # noqa: E402
from mpts.training.selector import Selector  # noqa: E402

K, THRESHOLD = 4, 1.0


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("trl") / "run"
    trl_harness.CALLS.clear()
    trainer = trl_harness.make_trainer(out)
    trainer.train()
    return out, trainer, list(trl_harness.CALLS)


def reference_selector(trainer, seed=3):
    """A selector built independently, with the adapter's defaults (beta + thompson_target)."""
    pool = trainer.selector.predictor.pool
    rule = get_acquisition_class("thompson_target")
    return Selector(get_predictor_class("beta")(pool, seed=seed), rule(), k=K, seed=seed)


def test_trace_rows_are_the_prompts_generated_for_and_their_outcomes(run):
    out, trainer, calls = run
    trace = pd.read_parquet(out / "mpts" / "trace.parquet")
    assert trace["step"].unique().tolist() == [0, 1, 2] and len(calls) == 3  # 6 optimiser steps / (4 / 2)
    for step, call in enumerate(calls):
        rows = trace[trace.step == step]
        assert len(rows) == 4  # B = per-device batch 4 x steps_per_generation 4 / num_generations 4
        assert call["idx"] == np.repeat(rows["prompt_id"].to_numpy(), K).tolist()  # each prompt's K copies in a row
        rewards = np.asarray(call["parity"]) + np.asarray(call["bonus"])  # reward_weights default to 1
        successes = (rewards.reshape(-1, K) >= THRESHOLD).sum(1)
        assert rows["successes"].tolist() == successes.tolist() and (rows["trials"] == K).all()
        assert not rows["failed"].any() and rows["kept"].all() and rows["selected_by"].eq("thompson_target").all()
    assert 0 < trace["successes"].sum() < trace["trials"].sum()


def test_selection_is_lag_free_and_the_state_equals_feeding_the_outcomes_directly(run):
    out, trainer, _ = run
    trace = pd.read_parquet(out / "mpts" / "trace.parquet")
    reference = reference_selector(trainer)
    for step, rows in trace.groupby("step"):
        # Each generation's choice is what a selector that has seen every earlier outcome picks.
        candidates = reference.sample_candidates(12, step)  # C = ratio 3 x B 4
        chosen = reference.select(candidates, 4, step)
        assert chosen.rows.tolist() == rows["prompt_id"].tolist()
        np.testing.assert_allclose(chosen.posterior.mean.double().numpy(), rows["pred_mean"].to_numpy(), rtol=1e-6)
        reference.observe(torch.tensor(rows["prompt_id"].to_numpy()), torch.tensor(rows["successes"].to_numpy()),
                          torch.tensor(rows["trials"].to_numpy()), step)
    mine, theirs = trainer.selector.state_dict(), reference.state_dict()
    for key, value in theirs["predictor"]["state"].items():
        torch.testing.assert_close(mine["predictor"]["state"][key], value)


def test_mpts_report_and_replay_read_the_run_folder(run, tmp_path):
    out, _, _ = run
    folder = out / "mpts"
    metrics = pd.read_parquet(folder / "metrics.parquet")
    assert metrics["cumulative_rollouts"].tolist() == [16, 32, 48] and metrics["global_step"].tolist() == [0, 2, 4]
    assert main(["replay", str(folder / "trace.parquet"), "--predictor", "hmm3", "--out", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["rows"] == 12
    assert main(["report", str(folder), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "report.md").is_file()
    # summary.json holds the mpts loop's per-run numbers, computed by the one summary path
    summary = json.loads((folder / "summary.json").read_text())
    target = yaml.safe_load((folder / "config.yaml").read_text())["target_accuracy"]
    expected = run_summary(pd.read_parquet(folder / "trace.parquet"), metrics, target)
    assert summary["reference"] is None and summary["total_rollouts"] == 48 and summary["steps"] == 3
    for key, value in expected.items():
        recorded = float("nan") if summary[key] is None else summary[key]  # JSON writes NaN as null
        assert recorded == pytest.approx(value, nan_ok=True), key


def test_resume_from_a_checkpoint_restores_the_selector_and_continues_the_run_folder(run, tmp_path):
    out, trainer, _ = run
    copy = tmp_path / "run"
    shutil.copytree(out / "checkpoint-2", copy / "checkpoint-2")  # stopped after optimiser step 2 (1 generation)
    saved = torch.load(copy / "checkpoint-2" / "mpts_selector.pt", weights_only=True)
    assert saved["generation"] == 1 and saved["cumulative_rollouts"] == 16

    with pytest.raises(FileNotFoundError, match="no mpts_selector.pt"):
        empty = tmp_path / "foreign" / "checkpoint-2"
        shutil.copytree(out / "checkpoint-2", empty)
        (empty / "mpts_selector.pt").unlink()
        trl_harness.make_trainer(tmp_path / "foreign").train(resume_from_checkpoint=str(empty))
    # the rows before the checkpoint live in the run folder: without it the resume is refused, naming it
    with pytest.raises(ValueError, match="mpts run folder .* cannot resume: .*no such folder"):
        trl_harness.make_trainer(copy).train(resume_from_checkpoint=str(copy / "checkpoint-2"))
    shutil.copytree(out / "mpts", copy / "mpts")  # the finished run's folder: steps 1-2 will be redone
    resumed = trl_harness.make_trainer(copy)
    resumed.train(resume_from_checkpoint=str(copy / "checkpoint-2"))
    trace = pd.read_parquet(copy / "mpts" / "trace.parquet")
    original = pd.read_parquet(out / "mpts" / "trace.parquet")
    # no lost or repeated generation; the rows before the checkpoint are the original's
    assert sorted(trace["step"].unique()) == [0, 1, 2] and len(trace) == len(original)
    pd.testing.assert_frame_equal(trace[trace.step == 0], original[original.step == 0])
    assert pd.read_parquet(copy / "mpts" / "metrics.parquet")["cumulative_rollouts"].tolist() == [16, 32, 48]
    # the rows the first run wrote after the checkpoint are set aside, not deleted
    orphaned = sorted(p.name for p in (copy / "mpts" / "parts" / ".orphaned").rglob("*.parquet"))
    assert orphaned == ["metrics-0000001-0000001.parquet", "metrics-0000002-0000002.parquet", "metrics.parquet",
                        "trace-0000001-0000001.parquet", "trace-0000002-0000002.parquet", "trace.parquet"]
    # the resumed predictor is exactly the outcomes of its trace fed in order
    reference = reference_selector(resumed)
    for step, rows in trace.groupby("step"):
        reference.observe(torch.tensor(rows["prompt_id"].to_numpy()), torch.tensor(rows["successes"].to_numpy()),
                          torch.tensor(rows["trials"].to_numpy()), step)
    for key, value in reference.state_dict()["predictor"]["state"].items():
        torch.testing.assert_close(resumed.selector.state_dict()["predictor"]["state"][key], value)

    with pytest.raises(FileExistsError, match="already holds an mpts run"):
        trl_harness.make_trainer(copy).train()


def test_the_run_folder_is_written_in_parts_with_a_manifest(run):
    out, _, _ = run
    folder = out / "mpts"
    manifest = json.loads((folder / "parts" / "manifest.json").read_text())["parts"]
    # one part per TRL checkpoint (save_steps=2: after each generation), each with its checksum
    assert [(p["kind"], p["first"], p["last"], p["rows"]) for p in manifest] == [
        ("metrics", 0, 0, 1), ("trace", 0, 0, 4), ("metrics", 1, 1, 1), ("trace", 1, 1, 4),
        ("metrics", 2, 2, 1), ("trace", 2, 2, 4)]
    assert sorted(p.name for p in (folder / "checkpoints").glob("step-*.pt")) == [
        "step-0000000.pt", "step-0000001.pt", "step-0000002.pt"]
    assert json.loads((folder / "progress.json").read_text()) == {"step": 3, "steps": 3, "status": "done"}
    parts = pd.concat([pd.read_parquet(folder / "parts" / p["file"]) for p in manifest if p["kind"] == "trace"],
                      ignore_index=True)
    pd.testing.assert_frame_equal(parts, pd.read_parquet(folder / "trace.parquet"))


@pytest.mark.parametrize("selection, message", [
    ({"candidate_ratio": 0}, "selection: candidate_ratio: Input should be greater than or equal to 1 (got 0)"),
    ({"predictor_option": {}}, "selection: predictor_option: unknown key (known: predictor, predictor_options, "),
    ({"predictor_options": {"decy": 0.5}}, "selection.predictor_options (beta): decy: unknown key (known: decay, "),
    ({"rule": "thompson_target", "rule_options": {"target": 2}}, "selection.rule_options (thompson_target): target: "),
    ({"rule": "dynamic_sampling"}, "selection.rule: acquisition 'dynamic_sampling' cannot drive TRL"),
    ({"predictor": "nope"}, "selection.predictor: unknown predictor 'nope'; known: "),
])
def test_bad_selection_options_are_refused_before_training_in_one_line(tmp_path, selection, message):
    with pytest.raises(ValueError) as refused:
        trl_harness.make_trainer(tmp_path, selection=selection)
    text = str(refused.value)
    assert text.startswith(message) and "\n" not in text and "http" not in text, text
    assert not (tmp_path / "mpts").exists()


def test_two_processes_select_identically(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    done = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", "29561",
                           str(Path(__file__).with_name("trl_harness.py")), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    trace = pd.read_parquet(tmp_path / "mpts" / "trace.parquet")
    calls = [json.loads((tmp_path / f"calls-{rank}.json").read_text()) for rank in (0, 1)]
    assert trace["step"].unique().tolist() == [0, 1] and len(calls[0]) == len(calls[1]) == 2
    for step, rows in trace.groupby("step"):
        assert len(rows) == 8  # B = 4 per process x 4 steps_per_generation x 2 processes / 4 generations
        # rank 0 generated for the first half of the global list, rank 1 for the second
        assert calls[0][step]["idx"] + calls[1][step]["idx"] == np.repeat(rows["prompt_id"].to_numpy(), K).tolist()
        rewards = np.asarray(calls[0][step]["parity"] + calls[1][step]["parity"]) + \
            np.asarray(calls[0][step]["bonus"] + calls[1][step]["bonus"])
        assert rows["successes"].tolist() == (rewards.reshape(-1, K) >= THRESHOLD).sum(1).tolist()
    states = [torch.load(tmp_path / f"selector-{rank}.pt", weights_only=True) for rank in (0, 1)]
    for key, value in states[0]["predictor"]["state"].items():
        torch.testing.assert_close(states[1]["predictor"]["state"][key], value)


def test_num_iterations_reuses_each_generation(tmp_path):
    trl_harness.CALLS.clear()
    trainer = trl_harness.make_trainer(tmp_path, steps_per_generation=2, num_iterations=2, max_steps=4, save_steps=10)
    trainer.train()
    trace = pd.read_parquet(tmp_path / "mpts" / "trace.parquet")
    # a generation every steps_per_generation x num_iterations = 4 micro-steps = 2 optimiser steps
    assert trace["step"].unique().tolist() == [0, 1] and len(trl_harness.CALLS) == 2
    for step, call in enumerate(trl_harness.CALLS):
        rows = trace[trace.step == step]
        assert len(rows) == 2 and call["idx"] == np.repeat(rows["prompt_id"].to_numpy(), K).tolist()


def test_prompts_no_reward_function_scores_are_failed_counted_warned_and_not_observed(tmp_path):
    trl_harness.CALLS.clear()
    trl_harness.UNSCORED.update(range(0, 24, 2))  # every even prompt id
    try:
        trainer = trl_harness.make_trainer(tmp_path, max_steps=4, save_steps=10)
        with pytest.warns(RewardWarning, match=r"rollouts have no usable reward \(reward function 'parity' gave "
                                               r"\d+ None/NaN; 'bonus' gave \d+ None/NaN\)"):
            trainer.train()
    finally:
        trl_harness.UNSCORED.clear()
    trace = pd.read_parquet(tmp_path / "mpts" / "trace.parquet")
    even = trace["prompt_id"] % 2 == 0
    assert even.any() and (~even).any()
    assert trace.loc[even, "failed"].all() and (trace.loc[even, "trials"] == 0).all() and not trace.loc[even, "kept"].any()
    assert trace.loc[even, "pred_log_prob"].isna().all() and not trace.loc[~even, "failed"].any()
    # each step's metrics count the rollouts without a usable reward (K per even prompt)
    metrics = pd.read_parquet(tmp_path / "mpts" / "metrics.parquet")
    assert metrics["nonfinite_rewards"].tolist() == (trace[even].groupby("step").size() * K).reindex(
        metrics["step"], fill_value=0).tolist()
    assert metrics["failed_prompts"].tolist() == trace.groupby("step")["failed"].sum().tolist()
    reference = reference_selector(trainer)
    for step, rows in trace[~even].groupby("step"):
        reference.observe(torch.tensor(rows["prompt_id"].to_numpy()), torch.tensor(rows["successes"].to_numpy()),
                          torch.tensor(rows["trials"].to_numpy()), step)
    for key, value in reference.state_dict()["predictor"]["state"].items():
        torch.testing.assert_close(trainer.selector.state_dict()["predictor"]["state"][key], value)


def test_an_infinite_reward_is_not_a_success(tmp_path):
    trl_harness.INFINITE.update(range(24))  # parity pays +inf: the weighted sum would pass any threshold
    try:
        trainer = trl_harness.make_trainer(tmp_path, max_steps=2, save_steps=10, selection={"missing_rewards": "skip"})
        with pytest.warns(RewardWarning, match=r"16 of 16 rollouts .*'parity' gave 16 inf"):
            trainer.train()
    finally:
        trl_harness.INFINITE.clear()
    trace = pd.read_parquet(tmp_path / "mpts" / "trace.parquet")
    assert (trace["successes"] == 0).all() and (trace["trials"] == 0).all() and trace["failed"].all()
    assert pd.read_parquet(tmp_path / "mpts" / "metrics.parquet")["nonfinite_rewards"].tolist() == [16]


def test_a_generation_without_any_usable_reward_stops_training_with_one_line(tmp_path):
    trl_harness.UNSCORED.update(range(24))
    try:
        trainer = trl_harness.make_trainer(tmp_path / "run", max_steps=2, save_steps=10)
        before = copy.deepcopy(trainer.selector.state_dict())
        with pytest.raises(NoUsableRewardError) as refused:
            trainer.train()
    finally:
        trl_harness.UNSCORED.clear()
    message = str(refused.value)
    assert "\n" not in message and "step 0: 16 of 16 rollouts have no usable reward" in message
    assert "'parity' gave 16 None/NaN; 'bonus' gave 16 None/NaN" in message and "'missing_rewards': 'skip'" in message
    for key, value in before["predictor"]["state"].items():  # nothing was observed
        torch.testing.assert_close(trainer.selector.state_dict()["predictor"]["state"][key], value)
