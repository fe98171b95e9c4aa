"""Replay: a hand-made trace in every accepted format, scored prequentially; bad traces rejected."""

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from mpts.training.cli import main
from mpts.training.replay import TraceError, read_trace, replay

HAND_MADE = pd.DataFrame({
    "step": [0, 0, 1, 1, 2],
    "prompt_id": [0, 1, 0, 2, 0],
    "successes": [2, 8, 3, 0, 4],
    "trials": [4, 8, 4, 8, 4],
})


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".jsonl"])
def test_replay_scores_each_prediction_before_its_outcome(tmp_path, suffix):
    path = tmp_path / f"trace{suffix}"
    {".parquet": lambda: HAND_MADE.to_parquet(path), ".csv": lambda: HAND_MADE.to_csv(path, index=False),
     ".jsonl": lambda: HAND_MADE.to_json(path, orient="records", lines=True)}[suffix]()
    scores, table = replay(read_trace(path), "beta", {"decay": 1.0})
    # prompt 0: Beta(1,1) at step 0; Beta(3,3) at step 1; Beta(6,4) at step 2
    expected = [stats.betabinom(4, 1, 1).logpmf(2), stats.betabinom(4, 3, 3).logpmf(3), stats.betabinom(4, 6, 4).logpmf(4)]
    got = table[table.prompt_id == 0].sort_values("step")["pred_log_prob"].to_numpy()
    assert np.allclose(got, expected)
    assert scores["rows"] == 5 and scores["steps"] == 3
    assert np.isclose(scores["log_predictive_density"], table["pred_log_prob"].mean())


def test_per_rollout_rows_are_summed_and_string_ids_mapped(tmp_path):
    rows = pd.DataFrame({"step": [0, 0, 0, 1], "prompt_id": ["a", "a", "b", "a"],
                         "successes": [1, 0, 1, 1], "trials": [1, 1, 1, 1]})
    path = tmp_path / "t.csv"
    rows.to_csv(path, index=False)
    trace = read_trace(path)
    assert trace[(trace.step == 0)].sort_values("prompt_id")[["successes", "trials"]].values.tolist() == [[1, 2], [1, 1]]


@pytest.mark.parametrize("mutate, message", [
    (lambda f: f.drop(columns=["trials"]), "missing column.*trials"),
    (lambda f: f.assign(successes=[2, 8, 3, float("nan"), 4]), "'successes' has a missing"),
    (lambda f: f.assign(successes=[2, 8, 3, -1, 4]), "'successes' is negative"),
    (lambda f: f.assign(successes=[5, 8, 3, 0, 4]), "successes > trials at step 0, prompt 0"),
    (lambda f: f.assign(trials=[4, 8, 4, 0, 4]), "trials must be >= 1"),
    (lambda f: f.assign(successes=["x", 8, 3, 0, 4]), "'successes' has a missing or non-numeric value \\('x'\\)"),
    (lambda f: f.assign(step=[0, 0.5, 1, 1, 2]), "'step' must hold whole numbers"),
    (lambda f: f.iloc[0:0], "no rows"),
])
def test_bad_traces_name_the_problem_and_leave_the_file_alone(tmp_path, mutate, message):
    path = tmp_path / "bad.csv"
    mutate(HAND_MADE.copy()).to_csv(path, index=False)
    before = path.read_bytes()
    with pytest.raises(TraceError, match=message):
        read_trace(path)
    assert path.read_bytes() == before


def test_corrupt_and_unknown_files(tmp_path):
    corrupt = tmp_path / "t.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(TraceError, match="could not be read as parquet"):
        read_trace(corrupt)
    with pytest.raises(TraceError, match="unknown format"):
        (tmp_path / "t.xlsx").write_text("x")
        read_trace(tmp_path / "t.xlsx")
    with pytest.raises(TraceError, match="does not exist"):
        read_trace(tmp_path / "missing.csv")


def test_unknown_predictor_and_bad_option():
    with pytest.raises(ValueError, match="^predictor.name: unknown predictor 'nope'; known: "):
        replay(HAND_MADE, "nope")
    with pytest.raises(ValueError, match="^predictor: decay_rate: unknown key"):
        replay(HAND_MADE, "beta", {"decay_rate": 0.3})


def test_replay_command_prints_and_writes_json(tmp_path, capsys):
    path = tmp_path / "trace.parquet"
    HAND_MADE.to_parquet(path)
    out = tmp_path / "scores.json"
    assert main(["replay", str(path), "--predictor", "beta", "--set", "decay=0.5", "--out", str(out)]) == 0
    scores = json.loads(out.read_text())
    assert scores["predictor"] == "beta" and scores["rows"] == 5
    assert main(["replay", str(tmp_path / "none.csv"), "--predictor", "beta"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_beta_replay_reproduces_the_log_predictive_density_from_before_issue_9():
    """A fixed trace and the density the closed-form Beta update gave at commit 2aec53d
    (tests/fixtures/replay_beta_reference.json); a change of update maths moves it. That beta
    predicted the undecayed posterior, as MoPPS does: `mopps_exact` must reproduce it exactly."""
    from pathlib import Path
    fixtures = Path(__file__).parent / "fixtures"
    reference = json.loads((fixtures / "replay_beta_reference.json").read_text())["beta"]
    trace = read_trace(fixtures / "replay_trace.csv")
    for case in reference.values():
        scores, _ = replay(trace, "beta", {**case["options"], "mopps_exact": True})
        assert abs(scores["log_predictive_density"] - case["log_predictive_density"]) < 1e-9, case
