"""One interval method for ablate and report: t-intervals over seeds, paired by seed for comparisons."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from mpts.reports.stats import mean_interval, paired_difference, paired_ratio
from mpts.training.ablate import aggregate, format_table


def t_interval(values):
    values = np.asarray(values, dtype=float)
    return stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values))


def test_mean_interval_is_the_student_t_interval_over_the_finite_values():
    e = mean_interval([1.0, 2.0, 4.0, math.nan, None])
    assert (e.lo, e.hi) == pytest.approx(t_interval([1.0, 2.0, 4.0]))
    assert (e.mean, e.n, e.total) == (pytest.approx(7 / 3), 3, 5)
    assert mean_interval([2.5]).as_dict() == {"mean": 2.5, "lo": 2.5, "hi": 2.5, "n": 1, "total": 1}
    assert mean_interval([math.nan]).mean is None


def test_pairing_by_seed_removes_the_between_seed_spread():
    """Seeds differ a lot (world difficulty), the arm is better by ~10 on each: only pairing sees it."""
    seeds = range(5)
    world = {s: 1000.0 * s for s in seeds}
    arm = {s: world[s] - 10 + (s % 2) for s in seeds}
    difference = paired_difference(arm, world)
    assert difference.hi < 0 and (difference.lo, difference.hi) == pytest.approx(
        t_interval([arm[s] - world[s] for s in seeds]))
    unpaired_lo = mean_interval(list(arm.values())).lo - mean_interval(list(world.values())).hi
    assert unpaired_lo < -1000  # the unpaired intervals overlap widely


def test_paired_comparisons_use_only_seeds_both_arms_have_values_for():
    arm = {0: 100.0, 1: math.nan, 2: 300.0, 3: 80.0}
    reference = {0: 200.0, 1: 250.0, 2: 600.0}  # seed 3 never ran for the reference
    difference = paired_difference(arm, reference)
    assert (difference.mean, difference.n, difference.total) == (-200.0, 2, 4)
    ratio = paired_ratio(arm, reference)
    assert ratio.mean == pytest.approx(0.5) and ratio.lo == pytest.approx(0.5) and ratio.n == 2
    assert paired_ratio({0: 0.0}, {0: 5.0}).mean is None  # no positive pair: no ratio


def summaries(rule, offsets, reference=None):
    return [{"run": f"beta__{rule}__seed{s}", "predictor": "beta", "acquisition": rule, "seed": s,
             "rollouts_to_target": 1000.0 * (s + 1) + offset, "final_eval_accuracy": 0.5 + 0.1 * s + offset / 1e4,
             "mean_effective_ratio": 0.4, "log_predictive_density": -1.0, "ece": 0.1, "spearman_true": 0.5}
            for s, offset in enumerate(offsets)]


def test_ablate_table_shows_paired_differences_with_the_report_s_interval():
    frame = pd.DataFrame(summaries("uniform", [0, 0, 0]) + summaries("thompson_target", [-300, -200, -250]))
    table = aggregate(frame).set_index("acquisition")
    row = table.loc["thompson_target"]
    expected = paired_difference({0: -300.0, 1: -200.0, 2: -250.0}, {0: 0.0, 1: 0.0, 2: 0.0})
    assert row["vs_uniform.rollouts_to_target"] == pytest.approx(expected.mean)
    assert row["vs_uniform.rollouts_to_target_ci"] == pytest.approx((expected.hi - expected.lo) / 2)
    assert row["rollouts_to_target_ci"] == pytest.approx((mean_interval([700, 1800, 2750]).hi
                                                           - mean_interval([700, 1800, 2750]).lo) / 2)
    assert pd.isna(table.loc["uniform"].get("vs_uniform.rollouts_to_target", math.nan))  # no self-comparison
    text = format_table(aggregate(frame))
    assert "Paired differences with uniform" in text
    assert f"| beta | thompson_target | {expected.mean:+.0f} ± {(expected.hi - expected.lo) / 2:.0f} |" in text
