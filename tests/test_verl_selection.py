"""The verl adapter's selection half without verl: choose, observe a verl-shaped batch, refuse bad
batches without changing anything, and write a run folder that `mpts report` and `mpts replay` read.
(`tests/test_verl.py` drives the same code through verl's real trainer in `.venv-verl`.)"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mpts.integrations.verl_selection import (PromptSelection, SelectionConfig, VerlSelectionError, checked_labels,
                                              read_selection_config)
from mpts.training.cli import main as mpts_main
from mpts.training.rewards import RewardWarning

B, K, RATIO, N = 3, 4, 2, 20


def make_selection(tmp_path, labels=None, texts=None, **options) -> PromptSelection:
    labels = np.array([100 + 5 * i for i in range(N)]) if labels is None else labels
    config = read_selection_config({"candidate_ratio": RATIO, "seed": 1, **options})
    selection = PromptSelection(config, labels, B, K, tmp_path / "run", texts=texts)
    selection.start(total_steps=4)
    return selection


def rollouts(selection: PromptSelection, rows: list[int], generator: np.random.Generator):
    """verl-shaped outcomes of the chosen rows: k rollouts each, shuffled as batch balancing does."""
    labels = np.repeat(selection.labels[rows], K)
    rewards = (generator.random(len(labels)) < 0.5).astype(np.float64)
    order = generator.permutation(len(labels))
    return np.array([{"index": label.item()} for label in labels[order]], dtype=object), rewards[order]


def test_outcomes_are_grouped_by_index_and_observed_once_per_step(tmp_path):
    selection, generator = make_selection(tmp_path), np.random.default_rng(0)
    for step in (0, 1, 2):
        rows = selection.choose()
        infos, rewards = rollouts(selection, rows, generator)
        selection.observe(infos, rewards, step)
        trace = selection.row[1]
        labels = np.array([info["index"] for info in infos])
        expected = [int(rewards[labels == label].sum()) for label in selection.labels[rows]]
        assert trace["prompt_id"].tolist() == selection.labels[rows].tolist()
        assert trace["successes"].tolist() == expected and set(trace["trials"]) == {K}
    summary = selection.finish(total_steps=3)
    assert summary["steps"] == 3 and summary["total_rollouts"] == 3 * B * K


def test_the_run_folder_is_read_by_mpts_report_and_mpts_replay(tmp_path):
    selection, generator = make_selection(tmp_path), np.random.default_rng(1)
    for step in (0, 1, 2, 3):
        selection.observe(*rollouts(selection, selection.choose(), generator), step)
    selection.finish(total_steps=4)
    run = tmp_path / "run"
    assert mpts_main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    report = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert [group["group"] for group in report["groups"]] == ["beta · thompson_target"]
    assert mpts_main(["report", str(run), "--out", str(tmp_path / "report")]) == 0  # its own folder: rewritten
    assert mpts_main(["replay", str(run / "trace.parquet"), "--predictor", "hmm3",
                      "--out", str(tmp_path / "replay.json")]) == 0
    assert json.loads((tmp_path / "replay.json").read_text())["steps"] == 4
    assert mpts_main(["replay", str(run), "--predictor", "hmm3", "--out", str(tmp_path / "replay.json")]) == 0
    assert json.loads((tmp_path / "replay.json").read_text())["steps"] == 4  # the run folder itself replays


@pytest.mark.parametrize("spoil, message", [
    (lambda infos, rewards: (np.array([{}] * len(infos)), rewards), "missing or None at row 0"),
    (lambda infos, rewards: (np.array([{"index": 100}] * len(infos)), rewards), "every row has extra_info"),
    (lambda infos, rewards: (None, rewards), "has no extra_info"),
    (lambda infos, rewards: (infos, np.full(len(rewards), np.nan)),
     r"step 1: 12 of 12 rollouts have no usable reward \(reward function 'score' gave 12 None/NaN\).*"
     r"mpts.missing_rewards=skip"),
    (lambda infos, rewards: (infos, np.where(np.arange(len(rewards)) == 2, "high", rewards.astype(object))),
     "reward 'score' holds a value that is not a number"),
    (lambda infos, rewards: (np.concatenate([infos[:-1], [{"index": 999}]]), rewards), "unknown prompt id 999"),
    (lambda infos, rewards: (infos[np.array([i["index"] != infos[0]["index"] for i in infos])],
                             rewards[np.array([i["index"] != infos[0]["index"] for i in infos])]),
     "was selected but verl's batch has no rollout of it"),
])
def test_a_bad_batch_is_refused_and_changes_nothing(tmp_path, spoil, message):
    selection, generator = make_selection(tmp_path), np.random.default_rng(2)
    selection.observe(*rollouts(selection, selection.choose(), generator), 0)
    rows = selection.choose()
    infos, rewards = rollouts(selection, rows, generator)
    before = copy.deepcopy(selection.selector.predictor.state_dict())
    with pytest.raises(VerlSelectionError, match=message):
        selection.observe(*spoil(infos, rewards), 1)
    after = selection.selector.predictor.state_dict()
    torch.testing.assert_close(after["state"], before["state"], rtol=0, atol=0)
    assert selection.steps_done == 1 and selection.pending is not None
    selection.observe(infos, rewards, 1)  # the good batch still goes through
    assert selection.steps_done == 2


def test_a_foreign_prompt_is_refused(tmp_path):
    selection, generator = make_selection(tmp_path), np.random.default_rng(3)
    rows = selection.choose()
    infos, rewards = rollouts(selection, rows, generator)
    stranger = next(label for label in selection.labels.tolist() if label not in selection.labels[rows])
    infos[0] = {"index": stranger}
    with pytest.raises(VerlSelectionError, match=f"prompt {stranger}, which mpts did not select"):
        selection.observe(infos, rewards, 0)


def test_the_prompt_texts_let_the_embedding_gp_select(tmp_path, monkeypatch):
    monkeypatch.setenv("MPTS_CACHE_DIR", str(tmp_path / "cache"))
    texts = [f"What is {i} + {i % 7}?" for i in range(N)]
    selection = make_selection(tmp_path, texts=texts, predictor={"name": "gp"}, acquisition={"name": "top_informative"})
    generator = np.random.default_rng(6)
    for step in (0, 1):
        selection.observe(*rollouts(selection, selection.choose(), generator), step)
    assert selection.selector.predictor.pool.features.shape == (N, 384)
    assert np.isfinite(selection.row[1]["pred_mean"]).all()


def test_selecting_ahead_of_the_outcomes_is_refused(tmp_path):
    selection = make_selection(tmp_path)
    selection.choose()
    with pytest.raises(VerlSelectionError, match="dataloader_num_workers must be 0"):
        selection.choose()


def test_string_indices_are_keyed_and_written_as_dataset_rows(tmp_path):
    labels = np.array([f"gsm8k-{i}" for i in range(N)])
    selection, generator = make_selection(tmp_path, labels=labels), np.random.default_rng(4)
    rows = selection.choose()
    selection.observe(*rollouts(selection, rows, generator), 0)
    assert selection.row[1]["prompt_id"].tolist() == rows


def test_resume_checks_the_run_folder_and_sets_later_rows_aside(tmp_path):
    selection, generator = make_selection(tmp_path), np.random.default_rng(5)
    states = []
    for step in (0, 1, 2):
        selection.observe(*rollouts(selection, selection.choose(), generator), step)
        if step < 2:
            states.append(selection.checkpoint(total_steps=4))
    selection.checkpoint(total_steps=4)  # step 2's rows and checkpoint: a resume from step 2 sets them aside
    second = PromptSelection(selection.options, selection.labels, B, K, tmp_path / "run")
    with pytest.raises(VerlSelectionError, match="being written by another process"):
        second.resume(states[1], 2)  # the first trainer still writes the folder
    selection.folder.unlock()  # the first trainer's process ends
    fresh = PromptSelection(selection.options, selection.labels, B, K, tmp_path / "run")
    with pytest.raises(VerlSelectionError, match="saved after 1 steps, verl resumes after 2"):
        fresh.resume(states[0], 2)
    fresh.resume(states[1], 2)
    assert fresh.steps_done == 2 and sorted(fresh.folder.read_parts("trace")["step"].unique()) == [0, 1]
    orphaned = list((tmp_path / "run" / "parts" / ".orphaned").glob("*/trace-*.parquet"))
    assert [p.name for p in orphaned] == ["trace-0000002-0000002.parquet"]  # kept, not deleted
    again = PromptSelection(selection.options, selection.labels, B, K, tmp_path / "run")
    with pytest.raises(VerlSelectionError, match="already holds a run"):
        again.start(total_steps=4)


def test_a_finished_run_releases_its_lock_so_a_later_resume_in_the_same_process_proceeds(tmp_path):
    """verl stops at total_training_steps and a later `resume_mode=auto` run (in a notebook, or a
    test, the same process) continues it: the finished run no longer holds the write lock."""
    selection, generator = make_selection(tmp_path), np.random.default_rng(9)
    for step in (0, 1):
        selection.observe(*rollouts(selection, selection.choose(), generator), step)
    state = selection.checkpoint(total_steps=2)
    selection.finish(total_steps=2)
    later = PromptSelection(selection.options, selection.labels, B, K, tmp_path / "run")
    later.resume(state, 2)
    assert later.steps_done == 2


@pytest.mark.parametrize("raw, message", [
    ({"predictor": {"name": "beta", "decai": 0.5}}, "predictor: decai: unknown key"),
    ({"predictor": {"name": "nope"}}, "unknown predictor 'nope'"),
    ({"candidate_ratio": 0}, "candidate_ratio"),
    ({"success_threshold": float("nan")}, "success_threshold"),
    ({"batch": 4}, "batch: unknown key"),
])
def test_a_bad_mpts_section_is_refused_naming_the_field(raw, message):
    with pytest.raises(VerlSelectionError, match=message) as refused:
        read_selection_config(raw)
    assert "\n" not in str(refused.value) and "http" not in str(refused.value)  # one line, no pydantic URL


def test_the_selection_config_built_in_python_refuses_in_one_line_saying_what_to_write():
    with pytest.raises(ValueError) as refused:
        SelectionConfig(candidate_ratio=0, predictr={})
    assert str(refused.value) == ("mpts: candidate_ratio: Input should be greater than or equal to 1 (got 0); "
                                  "predictr: unknown key (known: predictor, acquisition, candidate_ratio, "
                                  "success_threshold, reward, seed, out, target_accuracy, missing_rewards)")
    with pytest.raises(VerlSelectionError, match=r"^mpts.predictor: decai: unknown key \(known: decay, ") as refused:
        read_selection_config({"predictor": {"name": "beta", "decai": 0.5}})


@pytest.mark.parametrize("labels, message", [
    ([0, 0, 0], "every row has extra_info"), ([1, None], "missing or None at row 1"),
    ([1, "a"], "integers or strings"), ([1.5, 2.0], "integers or strings"),
])
def test_labels_verl_would_collapse_are_refused(labels, message):
    with pytest.raises(VerlSelectionError, match=message):
        checked_labels(labels, "training data")


def test_rollouts_without_a_usable_reward_are_counted_warned_and_not_trials(tmp_path):
    selection, generator = make_selection(tmp_path), np.random.default_rng(7)
    rows = selection.choose()
    infos, rewards = rollouts(selection, rows, generator)
    labels = np.array([info["index"] for info in infos])
    broken = selection.labels[rows[0]]  # every rollout of the first prompt: None, NaN or inf
    spoiled = rewards.astype(object)
    spoiled[np.flatnonzero(labels == broken)] = [None, np.nan, np.inf, -np.inf]
    spoiled[np.flatnonzero(labels != broken)[0]] = np.nan  # and one rollout of another prompt
    reference = copy.deepcopy(selection.selector)
    with pytest.warns(RewardWarning, match=r"step 0: 5 of 12 rollouts have no usable reward \(reward function "
                                           r"'score' gave 3 None/NaN, 2 inf\)"):
        selection.observe(infos, spoiled, 0)
    trace, metrics = selection.row[1], selection.row[2]
    assert metrics["nonfinite_rewards"] == 5 and metrics["failed_prompts"] == 1 and metrics["rollouts"] == B * K
    first = trace["prompt_id"] == broken
    assert trace.loc[first, "failed"].all() and (trace.loc[first, "trials"] == 0).all()
    assert trace.loc[~first, "trials"].sum() == 2 * K - 1 and not trace.loc[~first, "failed"].any()
    # only the usable rollouts of the other prompts were observed
    usable = ~first.to_numpy()
    reference.observe(selection.labels[np.asarray(rows)[usable]], torch.tensor(trace.loc[usable, "successes"].to_numpy()),
                      torch.tensor(trace.loc[usable, "trials"].to_numpy()), 0)
    torch.testing.assert_close(selection.selector.predictor.state_dict()["state"],
                               reference.predictor.state_dict()["state"], rtol=0, atol=0)


def test_a_step_without_usable_rewards_is_recorded_as_failed_when_asked(tmp_path):
    selection, generator = make_selection(tmp_path, missing_rewards="skip"), np.random.default_rng(8)
    before = copy.deepcopy(selection.selector.predictor.state_dict())
    infos, rewards = rollouts(selection, selection.choose(), generator)
    with pytest.warns(RewardWarning, match="12 of 12 rollouts"):
        selection.observe(infos, np.full(len(rewards), np.nan), 0)
    torch.testing.assert_close(selection.selector.predictor.state_dict()["state"], before["state"], rtol=0, atol=0)
    selection.observe(*rollouts(selection, selection.choose(), generator), 1)
    selection.finish(total_steps=2)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2
    recorded = pd.read_parquet(tmp_path / "run" / "metrics.parquet")
    assert recorded["nonfinite_rewards"].tolist() == [B * K, 0] and recorded["failed_prompts"].tolist() == [B, 0]


@pytest.mark.parametrize("missing", ["MODEL", "DATA"])
def test_the_example_launch_script_refuses_a_missing_setting_with_exit_2(tmp_path, missing):
    import os
    import subprocess

    script = Path(__file__).parents[1] / "examples" / "verl" / "run.sh"
    env = {key: value for key, value in os.environ.items() if key not in ("MODEL", "DATA")}
    env.update({"MODEL": "/models/qwen", "DATA": "/data/gsm8k"})
    del env[missing]
    done = subprocess.run([str(script)], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.startswith(f"error: set {missing} ") and done.stderr.count("\n") == 1
