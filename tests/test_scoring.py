"""Scoring rules and calibration metrics: hand-computed values, calibrated vs miscalibrated
simulations, and whole-trace scoring in the run-folder schema."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from mpts.inference.scoring import (
    SCORE_KEYS,
    auroc,
    brier_score,
    expected_calibration_error,
    log_predictive_density,
    observed_state,
    pit_coverage,
    reliability_table,
    score_trace,
    scores_by_window,
    spearman,
    state_confusion,
    truth_coverage,
)


# -- hand-computed values ---------------------------------------------------------------------

def test_brier_hand_value():
    # rates 0.5, 0, 1 -> squared errors 0, 0.04, 0.01
    assert brier_score([0.5, 0.2, 0.9], [2, 0, 4], [4, 2, 4]) == pytest.approx(0.05 / 3)


def test_log_predictive_density_hand_value():
    assert log_predictive_density(np.log([0.5, 0.25])) == pytest.approx(-1.5 * math.log(2))
    assert log_predictive_density([0.0, -math.inf]) == -math.inf
    assert math.isnan(log_predictive_density([]))


def test_ece_hand_value_two_bins():
    # bins {0.1, 0.2}: pred 0.15 vs 1/4; {0.3, 0.4}: pred 0.35 vs 3/4 -> (2*0.1 + 2*0.4) / 4
    pred, s, k = [0.4, 0.1, 0.3, 0.2], [2, 0, 1, 1], [2, 2, 2, 2]
    assert expected_calibration_error(pred, s, k, bins=2) == pytest.approx(0.25)
    table = reliability_table(pred, s, k, bins=2)
    assert list(table.columns) == ["bin", "count", "pred_mean", "observed_rate", "lo", "hi"]
    assert table["count"].tolist() == [2, 2]
    assert table["pred_mean"].to_numpy() == pytest.approx([0.15, 0.35])
    assert table["observed_rate"].to_numpy() == pytest.approx([0.25, 0.75])
    assert table["lo"].to_numpy() == pytest.approx([0.1, 0.3])
    assert table["hi"].to_numpy() == pytest.approx([0.2, 0.4])


def test_reliability_weights_prediction_by_trials():
    # one bin: expected successes 0.2*2 + 0.6*8 = 5.2 of 10 trials vs 4 observed
    table = reliability_table([0.2, 0.6], [1, 3], [2, 8], bins=1)
    assert table["pred_mean"].iloc[0] == pytest.approx(0.52)
    assert table["observed_rate"].iloc[0] == pytest.approx(0.4)
    assert expected_calibration_error([0.2, 0.6], [1, 3], [2, 8], bins=1) == pytest.approx(0.12)


def test_reliability_keeps_ties_together_and_ignores_row_order():
    pred = np.array([0.3] * 8 + [0.7, 0.8])
    s = np.array([0, 1, 2, 3, 4, 0, 1, 2, 3, 4])
    k = np.full(10, 4)
    table = reliability_table(pred, s, k, bins=5)
    assert table["count"].tolist() == [8, 2]
    assert table["lo"].iloc[0] == table["hi"].iloc[0] == 0.3
    order = np.random.default_rng(0).permutation(10)
    pd.testing.assert_frame_equal(table, reliability_table(pred[order], s[order], k[order], bins=5))
    # all predictions equal: one bin, no crash
    assert len(reliability_table(np.full(50, 0.5), np.zeros(50), np.full(50, 4))) == 1


def test_reliability_with_fewer_rows_than_bins():
    table = reliability_table([0.9, 0.1, 0.5], [1, 0, 1], [1, 1, 2], bins=10)
    assert table["count"].tolist() == [1, 1, 1]
    assert table["pred_mean"].to_numpy() == pytest.approx([0.1, 0.5, 0.9])
    assert table["bin"].tolist() == [0, 1, 2]
    assert reliability_table([], [], [], bins=10).empty
    assert math.isnan(expected_calibration_error([], [], []))


def test_auroc_hand_value_with_ties():
    # pairs (pos, neg): 0.4 v 0.1 -> 1, 0.4 v 0.4 -> 1/2, 0.8 v 0.1 -> 1, 0.8 v 0.4 -> 1
    assert auroc([0.1, 0.4, 0.4, 0.8], [0, 0, 1, 1]) == pytest.approx(3.5 / 4)
    label = np.array([True, False, True, False, False, True])
    score = label.astype(float) * 0.5 + 0.1
    assert auroc(score, label) == 1.0
    assert auroc(-score, label) == 0.0
    assert auroc(np.full(6, 0.3), label) == 0.5
    assert math.isnan(auroc([0.2, 0.7], [True, True]))


def test_spearman_sign_and_degenerate_cases():
    x = np.array([0.1, 0.5, 0.2, 0.9, 0.4])
    assert spearman(x, x ** 3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert math.isnan(spearman(x, np.ones(5)))
    assert math.isnan(spearman([0.1, 0.2], [0.3, 0.4]))
    # NaN pairs are dropped, the rest still ranks
    assert spearman([0.1, np.nan, 0.3, 0.2], [1.0, 5.0, 3.0, 2.0]) == pytest.approx(1.0)


def test_pit_and_truth_coverage_hand_values():
    pit = [0.1, 0.25, 0.5, 0.75, 0.9]
    assert pit_coverage(pit, 0.5) == pytest.approx(3 / 5)  # interval ends count as inside
    assert pit_coverage(pit, 0.9) == 1.0
    # the unknown truth is skipped: one of two inside
    assert truth_coverage([0.0, 0.2, 0.5], [0.5, 0.4, 0.6], [0.5, 0.1, np.nan]) == 0.5
    assert math.isnan(truth_coverage([0.1], [0.2], [np.nan]))


def test_state_confusion_hand_example():
    s = [0, 2, 4, 0, 3]
    k = [4, 4, 4, 4, 4]
    unsolved = [0.8, 0.1, 0.1, 0.1, 0.2]
    partial = [0.1, 0.8, 0.6, 0.2, 0.7]
    solved = [0.1, 0.1, 0.3, 0.7, 0.1]
    assert observed_state(s, k).tolist() == [0, 1, 2, 0, 1]
    table = state_confusion(unsolved, partial, solved, s, k)
    assert list(table.index) == ["unsolved", "partial", "solved"]
    assert table.to_numpy().tolist() == [[1, 0, 1], [0, 2, 0], [0, 1, 0]]


@pytest.mark.parametrize("call, field", [
    (lambda: brier_score([0.5], [3], [2]), "successes"),
    (lambda: brier_score([0.5], [0], [0]), "trials"),
    (lambda: brier_score([1.5], [1], [2]), "pred_mean"),
    (lambda: brier_score([np.nan], [1], [2]), "pred_mean"),
    (lambda: brier_score([0.5, 0.5], [1], [2]), "length"),
    (lambda: pit_coverage([0.5], 1.5), "level"),
    (lambda: auroc([0.1, 0.2], [0, 2]), "label"),
    (lambda: reliability_table([0.5], [1], [2], bins=0), "bins"),
])
def test_bad_input_names_the_field(call, field):
    with pytest.raises(ValueError, match=field):
        call()


# -- simulated calibration --------------------------------------------------------------------

def _randomised_pit(cdf_below, pmf, rng):
    return cdf_below + rng.uniform(size=pmf.shape) * pmf


def test_calibrated_predictor_scores_well_and_miscalibrated_does_not():
    rng = np.random.default_rng(1)
    n, k = 20_000, 8
    p = rng.beta(2.0, 3.0, size=n)
    s = rng.binomial(k, p)
    trials = np.full(n, k)

    ece_good = expected_calibration_error(p, s, trials)
    ece_bad = expected_calibration_error(p ** 0.3, s, trials)
    assert ece_good < 0.02
    assert ece_bad > 0.2 and ece_bad > 10 * ece_good

    pit = _randomised_pit(stats.binom.cdf(s - 1, k, p), stats.binom.pmf(s, k, p), rng)
    tolerance = 4 * math.sqrt(0.25 / n) + 0.005  # a few standard errors
    assert pit_coverage(pit, 0.5) == pytest.approx(0.5, abs=tolerance)
    assert pit_coverage(pit, 0.9) == pytest.approx(0.9, abs=tolerance)

    bad = p ** 0.3
    pit_bad = _randomised_pit(stats.binom.cdf(s - 1, k, bad), stats.binom.pmf(s, k, bad), rng)
    assert abs(pit_coverage(pit_bad, 0.5) - 0.5) > 0.05


# -- whole traces -----------------------------------------------------------------------------

def _bayes_trace(n=20_000, k=8, steps=10, seed=2):
    """A trace whose predictions are exact Bayesian posteriors under the true prior.

    p ~ Beta(2, 2); the predictor has seen 10 earlier trials and predicts with Beta(2 + x, 12 - x),
    so its predictive for the next k trials and its intervals for p are calibrated.
    """
    rng = np.random.default_rng(seed)
    true_p = rng.beta(2.0, 2.0, size=n)
    x = rng.binomial(10, true_p)
    a, b = 2.0 + x, 2.0 + 10 - x
    s = rng.binomial(k, true_p)
    pmf0 = stats.betabinom.pmf(0, k, a, b)
    pmfk = stats.betabinom.pmf(k, k, a, b)
    pit = _randomised_pit(stats.betabinom.cdf(s - 1, k, a, b), stats.betabinom.pmf(s, k, a, b), rng)
    return pd.DataFrame({
        "step": np.repeat(np.arange(steps), n // steps).astype(np.int64),
        "prompt_id": np.arange(n, dtype=np.int64),
        "successes": s.astype(np.int64),
        "trials": np.full(n, k, dtype=np.int64),
        "pred_mean": a / (a + b),
        "pred_var": a * b / ((a + b) ** 2 * (a + b + 1)),
        "pred_p_informative": 1.0 - pmf0 - pmfk,
        "pred_p_unsolved": pmf0,
        "pred_p_solved": pmfk,
        "pred_log_prob": stats.betabinom.logpmf(s, k, a, b),
        "pred_pit": pit,
        "pred_q05": stats.beta.ppf(0.05, a, b),
        "pred_q25": stats.beta.ppf(0.25, a, b),
        "pred_q75": stats.beta.ppf(0.75, a, b),
        "pred_q95": stats.beta.ppf(0.95, a, b),
        "selected_by": "uniform",
        "kept": True,
        "failed": False,
        "true_p": true_p,
    })


@pytest.fixture(scope="module")
def trace():
    return _bayes_trace()


def test_score_trace_on_a_calibrated_bayesian_trace(trace):
    scores = score_trace(trace)
    assert tuple(scores) == SCORE_KEYS
    assert scores["rows"] == len(trace)
    tolerance = 4 * math.sqrt(0.25 / len(trace)) + 0.005
    for key, nominal in [("coverage50", 0.5), ("coverage90", 0.9),
                         ("coverage50_true", 0.5), ("coverage90_true", 0.9)]:
        assert scores[key] == pytest.approx(nominal, abs=tolerance), key
    assert scores["ece"] < 0.02
    assert scores["spearman_empirical"] > 0.3
    assert scores["spearman_true"] > scores["spearman_empirical"]  # truth is less noisy than s/k
    assert 0.5 < scores["auroc_informative"] <= 1.0
    assert scores["log_predictive_density"] == pytest.approx(trace["pred_log_prob"].mean())
    assert scores["brier"] == pytest.approx(brier_score(trace["pred_mean"], trace["successes"], trace["trials"]))
    confusion = state_confusion(trace["pred_p_unsolved"], trace["pred_p_informative"], trace["pred_p_solved"],
                                trace["successes"], trace["trials"]).to_numpy()
    assert scores["state_accuracy"] == pytest.approx(np.trace(confusion) / len(trace))


def test_score_trace_ignores_failed_rows(trace):
    small = trace.iloc[:500]
    junk = small.iloc[:50].copy()
    junk["failed"] = True
    junk["successes"] = 0
    junk[["pred_mean", "pred_log_prob", "pred_pit"]] = np.nan  # a crashed rollout's row
    assert score_trace(pd.concat([small, junk], ignore_index=True)) == score_trace(small)


def test_score_trace_without_truth_and_without_rows(trace):
    small = trace.iloc[:500]
    for no_truth in (small.drop(columns="true_p"), small.assign(true_p=None)):
        scores = score_trace(no_truth)
        for key in ("spearman_true", "coverage50_true", "coverage90_true"):
            assert math.isnan(scores[key])
        assert not math.isnan(scores["coverage50"])
    empty = score_trace(small.assign(failed=True))
    assert empty["rows"] == 0
    assert all(math.isnan(value) for key, value in empty.items() if key != "rows")


def test_score_trace_names_the_missing_column(trace):
    with pytest.raises(ValueError, match="pred_pit"):
        score_trace(trace.drop(columns="pred_pit"))
    bad = trace.iloc[:10].copy()
    bad.loc[bad.index[0], "pred_q25"] = 1.5
    with pytest.raises(ValueError, match="pred_q25"):
        score_trace(bad)


def test_scores_by_window_rows_and_columns(trace):
    windows = scores_by_window(trace, 3)  # steps 0..9 -> [0,2] [3,5] [6,8] [9,11]
    assert len(windows) == 4
    assert list(windows.columns) == ["window_start", "window_end", *SCORE_KEYS]
    assert windows["window_start"].tolist() == [0, 3, 6, 9]
    assert windows["window_end"].tolist() == [2, 5, 8, 11]
    assert windows["rows"].sum() == len(trace)
    # a step range with nothing in it keeps its window, with rows = 0
    gappy = trace[(trace["step"] < 3) | (trace["step"] > 5)]
    gap = scores_by_window(gappy, 3)
    assert len(gap) == 4 and gap["rows"].iloc[1] == 0 and math.isnan(gap["ece"].iloc[1])
    with pytest.raises(ValueError, match="window_steps"):
        scores_by_window(trace, 0)
    with pytest.raises(ValueError, match="step"):
        scores_by_window(trace.drop(columns="step"), 3)


def test_float32_rounding_just_outside_unit_interval_is_accepted():
    assert brier_score([1.0 + 1e-7], [2], [2]) == 0.0
    assert pit_coverage([-1e-8, 0.5], 0.5) == 0.5
