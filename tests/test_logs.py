"""Replay of other systems' logs: verl rollout dumps and per-rollout tables with prompt texts."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from mpts.models.registry import predictor_names
from mpts.training.cli import main
from mpts.training.logs import read_log, read_prompt_info, replay_pool, rollouts_to_trace, successes_of
from mpts.training.replay import TraceError, replay

PROMPTS = ["What is 2 + 3?", "What is 7 * 6?", "Solve x + 4 = 9.", "Name a prime above 10.", "What is 12 / 4?"]
# (step, prompt index, rewards of its rollouts); steps from 1 as verl writes them
ROLLOUTS = [(1, 0, [1.0, 0.0, 1.0, 1.0]), (1, 1, [0.0, 0.0, 0.0, 0.0]), (1, 2, [1.0, 1.0, 1.0, 1.0]),
            (2, 0, [1.0, 1.0, 0.1, 1.0]), (2, 3, [0.0, 1.0, 0.0, 0.0]), (2, 4, [1.0, 0.0, 1.0, 0.0]),
            (3, 1, [0.0, 1.0, 0.0, 0.0]), (3, 3, [1.0, 1.0, 0.0, 1.0]), (3, 4, [0.5, 1.0, 1.0, 1.0])]


def write_verl_dump(folder, rollouts=ROLLOUTS):
    folder.mkdir()
    for step in sorted({r[0] for r in rollouts}):
        lines = [json.dumps({"input": PROMPTS[i], "output": f"answer {j}", "gts": "x", "score": reward,
                             "step": step, "acc": float(reward >= 1.0)})
                 for s, i, rewards in rollouts if s == step for j, reward in enumerate(rewards)]
        (folder / f"{step}.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "notes.txt").write_text("not a dump file")  # other files in the folder are ignored
    return folder


def rollout_table(rollouts=ROLLOUTS):
    return pd.DataFrame([{"step": s, "prompt": PROMPTS[i], "reward": r}
                         for s, i, rewards in rollouts for r in rewards])


def expected_trace(threshold=1.0):
    order = list(dict.fromkeys(PROMPTS[i] for _, i, _ in ROLLOUTS))  # ids by first appearance
    rows = [(s, order.index(PROMPTS[i]), sum(r >= threshold for r in rewards), len(rewards)) for s, i, rewards in ROLLOUTS]
    return pd.DataFrame(rows, columns=["step", "prompt_id", "successes", "trials"]).sort_values(
        ["step", "prompt_id"], ignore_index=True), tuple(order)


@pytest.mark.parametrize("threshold", [1.0, 0.5])
def test_verl_dump_groups_rollouts_by_input_text(tmp_path, threshold):
    trace, texts = read_log(write_verl_dump(tmp_path / "dump"), success_threshold=threshold)
    expected, expected_texts = expected_trace(threshold)
    pd.testing.assert_frame_equal(trace.reset_index(drop=True), expected, check_dtype=False)
    assert texts == expected_texts


def test_prompt_table_matches_the_verl_dump(tmp_path):
    path = tmp_path / "rollouts.csv"
    rollout_table().to_csv(path, index=False)
    trace, texts = read_log(path)
    dump_trace, dump_texts = read_log(write_verl_dump(tmp_path / "dump"))
    pd.testing.assert_frame_equal(trace, dump_trace)
    assert texts == dump_texts


def test_a_reward_column_can_be_named_and_acc_is_used_as_logged(tmp_path):
    folder = write_verl_dump(tmp_path / "dump")
    by_acc, _ = read_log(folder, reward_column="acc", success_threshold=0.5)
    by_score, _ = read_log(folder)
    pd.testing.assert_frame_equal(by_acc, by_score)


def test_successes_of_counts_rewards_at_or_above_the_threshold():
    rewards = torch.tensor([[1.0, 0.0, 2.5, -1.0], [0.99, 1.0, 1.0, 1.0]])
    assert successes_of(rewards).tolist() == [2, 3]
    assert successes_of(rewards, threshold=-1.0).tolist() == [4, 4]
    with pytest.raises(ValueError, match="NaN"):
        successes_of(torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="threshold"):
        successes_of(rewards, threshold=float("inf"))


@pytest.mark.parametrize("predictor", predictor_names())
@pytest.mark.parametrize("shape", ["verl_dump", "prompt_csv"])
def test_every_predictor_replays_a_log_with_prompt_texts(tmp_path, predictor, shape):
    if shape == "verl_dump":
        source = write_verl_dump(tmp_path / "dump")
    else:
        source = tmp_path / "rollouts.csv"
        rollout_table().to_csv(source, index=False)
    out = tmp_path / "scores.json"
    fast = {"gp": ["--set", "num_inducing=4", "--set", "svi_steps=5", "--set", "pca_dim=4"],
            "id_vae": ["--set", "svi_steps=3", "--set", "hidden_dim=8"]}.get(predictor, [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # hmm3_pooled: no clusters, pools globally (tested below)
        assert main(["replay", str(source), "--predictor", predictor, "--out", str(out), *fast]) == 0
    scores = json.loads(out.read_text())
    assert scores["predictor"] == predictor and scores["steps"] == 3 and scores["rows"] == len(ROLLOUTS)
    assert np.isfinite(scores["log_predictive_density"])


def test_gp_on_a_prompt_log_uses_the_embeddings_of_its_texts(tmp_path):
    trace, texts = rollouts_to_trace(rollout_table(), "log")
    pool = replay_pool(trace, texts)
    assert pool.texts == texts and pool.has_features
    from mpts.training.embeddings import embed_texts
    torch.testing.assert_close(pool.features, embed_texts(list(texts)))
    scores, _ = replay(trace, "gp", {"num_inducing": 4, "svi_steps": 5, "pca_dim": 4}, pool=pool)
    assert scores["rows"] == len(ROLLOUTS)


def test_hmm3_pooled_falls_back_to_global_pooling_with_a_warning(tmp_path):
    trace, texts = rollouts_to_trace(rollout_table(), "log")
    with pytest.warns(UserWarning, match="no clusters.*pooling='global'"):
        fallback, fallback_table = replay(trace, "hmm3_pooled", pool=replay_pool(trace, texts))
    _, global_table = replay(trace, "hmm3", {"pooling": "global", "pool_strength": 3.0, "state_reading": "posterior"},
                             pool=replay_pool(trace, texts))
    np.testing.assert_allclose(fallback_table["pred_log_prob"], global_table["pred_log_prob"])


def test_hmm3_asked_for_cluster_pooling_without_clusters_refuses():
    trace, texts = rollouts_to_trace(rollout_table(), "log")
    with pytest.raises(ValueError, match="pooling='cluster' needs pool.clusters"):
        replay(trace, "hmm3", {"pooling": "cluster"}, pool=replay_pool(trace, texts))


def test_a_sidecar_supplies_clusters_and_embeddings(tmp_path):
    trace, texts = rollouts_to_trace(rollout_table(), "log")
    embeddings = np.arange(len(texts) * 3, dtype=np.float32).reshape(len(texts), 3)
    sidecar = pd.DataFrame({"prompt": list(texts)[::-1], "cluster": [7, 7, 3, 3, 9][::-1],
                            "embedding": [list(row) for row in embeddings[::-1]]})
    path = tmp_path / "info.parquet"
    sidecar.to_parquet(path)
    pool = replay_pool(trace, texts, path)
    assert pool.clusters.tolist() == [7, 7, 3, 3, 9]
    torch.testing.assert_close(pool.features, torch.from_numpy(embeddings))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with clusters there is nothing to warn about
        replay(trace, "hmm3_pooled", pool=pool)
    # a sidecar for a whole dataset: prompts the log never saw are left out
    bigger = pd.concat([sidecar, pd.DataFrame({"prompt": ["never rolled out"], "cluster": [1],
                                               "embedding": [[0.0, 0.0, 0.0]]})])
    bigger.to_parquet(path)
    assert replay_pool(trace, texts, path).clusters.tolist() == [7, 7, 3, 3, 9]
    by_id = tmp_path / "info.csv"
    pd.DataFrame({"prompt_id": [4, 3, 2, 1, 0], "cluster": [0, 1, 0, 1, 0]}).to_csv(by_id, index=False)
    assert read_prompt_info(by_id, 5, None)["clusters"].tolist() == [0, 1, 0, 1, 0]


@pytest.mark.parametrize("table, message", [
    (pd.DataFrame({"prompt": ["a"] + PROMPTS[:4], "cluster": [1] * 5}), "1 of the log's 5 prompts are missing \\(e.g. 'What is 12 / 4\\?'\\)"),
    (pd.DataFrame({"prompt_id": [0, 1, 2, 3], "cluster": [1, 1, 1, 1]}), "1 of the log's 5 prompts are missing"),
    (pd.DataFrame({"prompt_id": [0, 1, 2, 3, 4], "cluster": [1, 1, None, 1, 1]}), "'cluster' must hold whole numbers"),
    (pd.DataFrame({"prompt_id": [0, 1, 2, 3, 4, 4], "cluster": [1] * 6}), "listed more than once"),
    (pd.DataFrame({"prompt_id": [0, 1, 2, 3, 4]}), "no 'cluster' or 'embedding' column"),
    (pd.DataFrame({"name": [0, 1, 2, 3, 4]}), "needs a 'prompt_id' or a 'prompt' column"),
])
def test_bad_sidecars_are_refused_by_name(tmp_path, table, message):
    path = tmp_path / "info.csv"
    table.to_csv(path, index=False)
    with pytest.raises(TraceError, match=message):
        read_prompt_info(path, 5, tuple(PROMPTS))


def test_bad_logs_are_refused_in_one_line(tmp_path, capsys):
    folder = write_verl_dump(tmp_path / "dump")
    (folder / "2.jsonl").write_text((folder / "2.jsonl").read_text()[:-40])  # truncated mid-line
    assert main(["replay", str(folder), "--predictor", "beta", "--out", str(tmp_path / "s.json")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and "2.jsonl: line 12 is not valid JSON" in error and "\n" not in error
    assert not (tmp_path / "s.json").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TraceError, match="is a folder with no verl rollout dump files"):
        read_log(empty)
    wrong_step = tmp_path / "wrong"
    wrong_step.mkdir()
    (wrong_step / "3.jsonl").write_text(json.dumps({"input": "a", "score": 1.0, "step": 2}) + "\n")
    with pytest.raises(TraceError, match="says step 2 but the file is step 3"):
        read_log(wrong_step)

    table = rollout_table()
    for mutate, message in [(lambda f: f.assign(reward=[None] + [1.0] * (len(f) - 1)), "missing or non-numeric reward"),
                            (lambda f: f.drop(columns=["reward"]), "no reward column"),
                            (lambda f: f.assign(prompt=[None] + list(f.prompt[1:])), "'prompt' has a missing"),
                            (lambda f: f.drop(columns=["step"]), "missing column 'step'")]:
        path = tmp_path / "bad.jsonl"
        mutate(table).to_json(path, orient="records", lines=True)
        with pytest.raises(TraceError, match=message):
            read_log(path)
    with pytest.raises(TraceError, match="no reward column \\('points'\\)"):
        rollouts_to_trace(table, "log", reward_column="points")
