"""Replay's streamed scores: equal to `score_columns` on the same rows, in ~36 bytes per row."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
import torch

from mpts.inference import scoring_stream
from mpts.inference.schema import SCORED_COLUMNS
from mpts.inference.scoring import TRUTH_ONLY_COLUMNS, score_columns
from mpts.inference.scoring_stream import StreamedScores

SPEARMAN_TOLERANCE = 1e-12  # summed block by block instead of by np.corrcoef; every other score is exact
COLUMNS = [c for c in SCORED_COLUMNS if c not in TRUTH_ONLY_COLUMNS]


def random_steps(seed: int, steps: int, rows: int, kind: str = "grid") -> list[dict[str, np.ndarray]]:
    """Float32 columns as a predictor gives them, with -inf log densities and predicted means a
    float32 hair outside [0, 1]. `kind`: "grid" (many ties), "continuous" (no ties; means spread
    over many magnitudes, so per-bin sums depend on the order they are added in), "edge" (28% of
    means at 0 or a hair below: one tie once clipped, two values before)."""
    generator = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        trials = generator.integers(1, 9, rows)
        if kind == "grid":
            p = generator.choice(np.linspace(0, 1, 23), rows)
            mean = p + generator.choice([0.0, 0.0, 0.0, 5e-7, -5e-7], rows)
        elif kind == "continuous":
            p = mean = generator.random(rows) ** 12
        else:
            p = generator.random(rows)
            p[:round(0.28 * rows)] = 0.0  # clipped, the pile's mid-rank bin holds the next means too; unclipped not
            mean = p - 5e-7 * ((p == 0) & (generator.random(rows) < 0.5))
        probs = generator.dirichlet(np.ones(3), rows)
        log = np.log(generator.random(rows))
        log[generator.random(rows) < 0.01] = -np.inf
        out.append({"successes": generator.binomial(trials, p), "trials": trials,
                    "pred_mean": np.clip(mean, -5e-7, 1 + 5e-7), "pred_log_prob": log,
                    "pred_p_informative": np.round(probs[:, 1], 2), "pred_p_unsolved": probs[:, 0],
                    "pred_p_solved": probs[:, 2], "pred_pit": generator.random(rows)})
    return [{name: np.asarray(value).astype(np.float32) for name, value in step.items()} for step in out]


def assert_equal_scores(streamed: dict, whole: dict) -> None:
    assert streamed.keys() == whole.keys()
    for key, value in whole.items():
        if key == "spearman_empirical" and not math.isnan(value):
            assert abs(streamed[key] - value) < SPEARMAN_TOLERANCE, key
        else:
            assert streamed[key] == value or (math.isnan(streamed[key]) and math.isnan(value)), (
                key, streamed[key], value)


@pytest.mark.parametrize("kind", ["grid", "continuous", "edge"])
@pytest.mark.parametrize("capacity", [True, False])
@pytest.mark.parametrize("block_rows", [7, 1000, 1 << 20])
def test_streamed_scores_equal_score_columns_whatever_the_blocks(monkeypatch, kind, capacity, block_rows):
    monkeypatch.setattr(scoring_stream, "BLOCK_ROWS", block_rows)
    steps = random_steps(0, 9, 211, kind)
    whole = score_columns({name: np.concatenate([s[name] for s in steps]) for name in COLUMNS})
    streamed = StreamedScores(9 * 211 if capacity else None)
    for step in steps:
        streamed.add(step)
    assert_equal_scores(streamed.result(), whole)
    assert not any(math.isnan(whole[k]) for k in ("ece", "spearman_empirical", "auroc_informative"))


def test_degenerate_rows_give_the_same_nan_as_score_columns():
    steps = random_steps(1, 2, 50)
    for step in steps:  # one prediction for every row and every row informative: spearman and auroc are nan
        step["pred_mean"][:] = 0.25
        step["trials"][:], step["successes"][:] = 4, 2
    streamed = StreamedScores()
    for step in steps:
        streamed.add(step)
    whole = score_columns({name: np.concatenate([s[name] for s in steps]) for name in COLUMNS})
    assert math.isnan(whole["spearman_empirical"]) and math.isnan(whole["auroc_informative"])
    assert_equal_scores(streamed.result(), whole)
    assert StreamedScores().result()["rows"] == 0


def test_a_bad_column_is_refused_naming_it():
    step = random_steps(2, 1, 10)[0]
    step["pred_pit"][3] = np.nan
    with pytest.raises(ValueError, match="pred_pit"):
        StreamedScores().add(step)


def test_a_replay_holds_its_scored_rows_in_the_bytes_the_memory_check_counts(monkeypatch):
    """numpy's allocations (traced by tracemalloc) while replaying 200 steps of 1000 prompts
    stay within SCORED_BYTES_PER_ROW per scored row, plus a block's and a step's work."""
    from mpts.training.replay import replay_selector, replay_steps
    from mpts.training.replay_stream import SCORED_BYTES_PER_ROW

    monkeypatch.setattr(scoring_stream, "BLOCK_ROWS", 4096)  # so the rows, not one block, dominate
    steps, per_step = 200, 1000
    generator = np.random.default_rng(0)
    data = [(step, np.arange(step * per_step, (step + 1) * per_step), generator.integers(0, 5, per_step),
             np.full(per_step, 4)) for step in range(steps)]
    selector, _ = replay_selector("beta", {}, steps * per_step, 0)
    torch.manual_seed(0)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        scores, _ = replay_steps(selector, iter(data), "beta", keep_table=False, rows=steps * per_step)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert scores["rows"] == steps * per_step
    allowed = steps * per_step * SCORED_BYTES_PER_ROW + 2 * 2**20  # measured: 37.6 bytes per row in all
    assert peak <= allowed, (peak, allowed, peak / (steps * per_step))
