"""`mpts bench`: every rule runs, the oracle ranks on the truth, the figures are consistent."""

import pytest

from mpts.training.bench import bench

SMALL = dict(pool=5000, candidates=512, batch=64, k=8, warmup=0)


@pytest.mark.parametrize("rule", ["dynamic_sampling", "uniform", "top_informative"])
def test_every_rule_benches(rule):
    figures = bench("beta", rule=rule, steps=3, **SMALL)
    assert figures["median_ms_per_step"] > 0 and 0 < figures["true_informative_share"] < 1


def test_oracle_ranks_on_the_truth_not_on_the_predictor():
    """At step 0 the predictor knows nothing (every prompt looks alike): only the truth helps."""
    oracle = bench("beta", rule="oracle", steps=1, **SMALL)["true_informative_share"]
    informed = bench("beta", rule="top_informative", steps=1, **SMALL)["true_informative_share"]
    assert oracle > informed + 0.05 and oracle > 0.98  # Beta(2, 2) truth: random picks give ~0.90


@pytest.mark.parametrize("steps", [1, 2, 3, 10])
def test_p90_is_never_below_the_median(steps):
    figures = bench("beta", rule="uniform", steps=steps, **SMALL)
    assert figures["p90_ms_per_step"] >= figures["median_ms_per_step"]


def test_zero_steps_is_a_clear_error():
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        bench("beta", steps=0, **SMALL)
