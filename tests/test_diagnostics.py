"""Selection diagnostics (overlap, concentration, greedy-solved share, trained vs held-out accuracy)
and the exclusion window, on the history tensors and through the loop."""

import numpy as np
import pandas as pd
import pytest
import torch

from mpts.training.config import ConfigError, load_config
from mpts.training.diagnostics import TrainingHistory, eligible_candidates
from mpts.training.loop import run

SMALL = ["steps=12", "batch_size=16", "candidate_ratio=4", "env.num_prompts=300", "env.eval_prompts=100",
         "checkpoint_every=5", "posterior_draws_prompts=0", "eval_every=4"]


def test_history_overlap_concentration_and_recent_prompts():
    history = TrainingHistory(pool_size=20, window=2)
    first = history.record(0, torch.tensor([0, 1, 2, 3]))
    assert first["recent_overlap"] == 0.0
    assert first["top_decile_share"] == pytest.approx(2 / 4)  # top 10% of 20 prompts = 2 prompts
    assert np.isnan(first["greedy_solved_share"])
    second = history.record(1, torch.tensor([0, 1, 4, 5]), greedy_solved=torch.tensor([True, False, False, False]))
    assert second["recent_overlap"] == 0.5 and second["greedy_solved_share"] == 0.25
    assert second["top_decile_share"] == pytest.approx(4 / 8)  # prompts 0 and 1 hold 4 of 8 updates
    assert history.record(4, torch.tensor([0]))["recent_overlap"] == 0.0  # step 1 is outside a window of 2
    assert history.trained_since(1).tolist() == [0, 1, 4, 5]
    assert history.recently_trained(5, 1).nonzero().squeeze(1).tolist() == [0]
    restored = TrainingHistory(pool_size=20)
    restored.load_state_dict(history.state_dict())
    assert torch.equal(restored.counts, history.counts) and torch.equal(restored.last_trained, history.last_trained)
    with pytest.raises(ValueError, match="pool of"):
        TrainingHistory(pool_size=5).load_state_dict(history.state_dict())


def test_eligible_candidates_skip_recent_prompts_and_refuse_too_few():
    history = TrainingHistory(pool_size=10)
    history.record(3, torch.arange(6))
    ids = eligible_candidates(history, 4, 2, 4, torch.Generator().manual_seed(0))
    assert sorted(ids.tolist()) == [6, 7, 8, 9]
    assert len(eligible_candidates(history, 6, 2, 8, torch.Generator())) == 8  # step 3 expired
    with pytest.raises(ValueError, match="exclusion_window=2: only 4 prompts"):
        eligible_candidates(history, 4, 2, 5, torch.Generator())


def test_loop_writes_selection_diagnostics_and_trained_accuracy(tmp_path):
    run(load_config("quickstart", SMALL), tmp_path / "r")
    metrics = pd.read_parquet(tmp_path / "r" / "metrics.parquet")
    assert metrics["recent_overlap"].iloc[0] == 0.0 and metrics["recent_overlap"].iloc[1:].between(0, 1).all()
    assert metrics["top_decile_share"].between(0.1, 1).all()
    evals = metrics["eval_accuracy"].notna()
    assert evals.tolist() == [(s + 1) % 4 == 0 for s in range(12)]
    assert metrics.loc[evals, "trained_accuracy"].between(0, 1).all()
    assert metrics.loc[~evals, "trained_accuracy"].isna().all()
    assert metrics["greedy_solved_share"].isna().all()  # the simulator has no greedy decoding


def test_exclusion_window_keeps_recent_prompts_out_for_any_rule(tmp_path):
    for rule in ("thompson_target", "uniform"):
        run(load_config("quickstart", SMALL + ["exclusion_window=3", f"acquisition={{name: {rule}}}"]), tmp_path / rule)
        trace = pd.read_parquet(tmp_path / rule / "trace.parquet")
        trained = trace[trace["kept"]].groupby("prompt_id")["step"].apply(lambda s: np.diff(np.sort(s.to_numpy())))
        gaps = np.concatenate([g for g in trained if len(g)] or [np.array([99])])
        assert gaps.min() > 3, rule
        metrics = pd.read_parquet(tmp_path / rule / "metrics.parquet")
        assert (metrics["recent_overlap"].iloc[1:4] == 0).all()  # the first 4 steps: no repeat can be 4+ steps old
    with pytest.raises(ValueError, match="exclusion_window=20"):
        run(load_config("quickstart", SMALL + ["exclusion_window=20"]), tmp_path / "too_long")
    with pytest.raises(ConfigError, match="exclusion_window"):
        load_config("quickstart", SMALL + ["exclusion_window=-1"])


def test_decay_unobserved_lets_a_prompt_seen_unsolved_be_retried_by_thompson_target(tmp_path):
    """The review's case: a prompt first seen at 0/8 is Beta(1, 9) and, without decay of unobserved
    prompts, stays far from the target until it happens to be rolled out again."""
    def rerolled(decay_unobserved):
        folder = tmp_path / str(decay_unobserved)
        run(load_config("quickstart", SMALL + ["steps=30", "env.num_prompts=200", "candidate_ratio=8",
                                               "predictor.decay=0.7",
                                               f"predictor.decay_unobserved={decay_unobserved}"]), folder)
        trace = pd.read_parquet(folder / "trace.parquet").sort_values(["prompt_id", "step"])
        previous = trace.groupby("prompt_id")["successes"].shift()
        gap = trace["step"] - trace.groupby("prompt_id")["step"].shift()
        return trace[(previous == 0) & (gap >= 5)]
    with_decay, without = rerolled(True), rerolled(False)
    # after a gap, a prompt last seen at 0/8 is predicted nearer the prior mean 0.5 with decay of unobserved prompts
    assert with_decay["pred_mean"].mean() > without["pred_mean"].mean() + 0.05


def test_learning_numbers_gain_is_last_three_evaluations_minus_the_initial_one():
    from mpts.inference.scoring import learning_numbers
    metrics = pd.DataFrame({"step": range(6), "eval_accuracy_greedy": [np.nan, 0.3, np.nan, 0.4, 0.5, 0.6],
                            "recent_overlap": [0, 0.5, 0.5, 0.5, 0.5, 0.5],
                            "top_decile_share": [0.1, 0.2, 0.2, 0.2, 0.2, 0.25]})
    numbers = learning_numbers(metrics, {"initial_eval_accuracy_greedy": 0.2})
    assert numbers["final_eval_accuracy_greedy"] == 0.6
    assert numbers["eval_gain_greedy"] == pytest.approx(0.5 - 0.2)
    assert numbers["mean_recent_overlap"] == pytest.approx(2.5 / 6) and numbers["final_top_decile_share"] == 0.25
    assert np.isnan(numbers["eval_gain_sampled"]) and np.isnan(numbers["mean_greedy_solved_share"])


def test_report_has_the_learning_and_selection_section(tmp_path):
    from mpts.reports import export_report
    run(load_config("quickstart", SMALL), tmp_path / "r")
    export_report([tmp_path / "r"], tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    assert "Learning and selection diagnostics" in text and "batch overlap with last 20 steps" in text
    assert (tmp_path / "report" / "figures" / "learning_curves.png").stat().st_size > 0


def test_lm_tiny_ablation_has_the_issue_10_arms_with_thompson_target_at_two_targets():
    from mpts.training.sweep import expand_grid
    runs = expand_grid(load_config("lm_tiny"))
    arms = sorted({run.name.rsplit("__seed", 1)[0] for run in runs})
    assert arms == ["beta__dynamic_sampling", "beta__thompson_target__acquisition.target=0.25",
                    "beta__thompson_target__acquisition.target=0.5", "beta__uniform", "hmm3__top_informative",
                    "id_vae__thompson_target__acquisition.target=0.25", "id_vae__thompson_target__acquisition.target=0.5"]
    assert len(runs) == 7 * 4
