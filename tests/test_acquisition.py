"""Acquisition rules pick what they promise, on hand-made posteriors; candidate sampling is uniform."""

import pytest
import torch
from pydantic import ValidationError
from scipy import stats

from mpts.models.posteriors import BetaPosterior, PointMassPosterior
from mpts.training.acquisition import (RULES, Acquisition, get_acquisition_class,
                                       sample_candidates)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def rule(name, **options):
    cls = get_acquisition_class(name)
    return cls(cls.Options(**options))


def sharp(means, strength=1e6):
    """A Beta posterior concentrated at `means` (Thompson draws land within ~1e-3 of them)."""
    m = torch.as_tensor(means, dtype=torch.float64)
    return BetaPosterior(m * strength, (1 - m) * strength)


def chosen(name, posterior, batch, seed=0, k=8, **options):
    picked = rule(name, **options).select(posterior, batch, gen(seed), k)
    assert picked.dtype == torch.int64
    assert picked.unique().numel() == picked.numel()
    return set(picked.tolist())


def test_registry_names_and_flags():
    assert set(RULES.names()) == {"uniform", "dynamic_sampling", "oracle", "thompson_target",
                                 "thompson_threshold", "top_informative", "risk", "uncertainty"}
    for name in RULES.names():
        cls = RULES.get(name)
        assert cls.name == name and issubclass(cls, Acquisition)
    assert get_acquisition_class("oracle").needs_truth
    assert get_acquisition_class("dynamic_sampling").rolls_out_all
    assert not any(cls.needs_truth for n in RULES.names() for cls in [RULES.get(n)] if n != "oracle")
    assert not any(cls.rolls_out_all for n in RULES.names() for cls in [RULES.get(n)] if n != "dynamic_sampling")
    with pytest.raises(KeyError, match="known: dynamic_sampling, oracle"):
        get_acquisition_class("thompson")


def test_options_are_validated():
    with pytest.raises(ValidationError, match="targt"):
        rule("thompson_target", targt=0.4)
    with pytest.raises(ValidationError, match="target"):
        rule("thompson_target", target=1.5)
    with pytest.raises(ValidationError, match="must not exceed high"):
        rule("thompson_threshold", low=0.8, high=0.2)
    with pytest.raises(ValidationError, match="extra"):
        rule("uniform", target=0.5)


def test_batch_size_errors_name_both_numbers():
    posterior = sharp([0.5] * 10)
    with pytest.raises(ValueError, match="batch_size 11 is larger than the 10 candidates"):
        rule("uniform").select(posterior, 11, gen(), 8)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        rule("top_informative").select(posterior, 0, gen(), 8)
    with pytest.raises(ValueError, match="k"):
        rule("top_informative").select(posterior, 2, gen(), 0)


def test_oracle_and_top_informative_pick_most_likely_informative():
    p = torch.tensor([0.0, 0.02, 0.5, 0.98, 1.0, 0.4, 0.7, 0.1])
    assert chosen("oracle", PointMassPosterior(p), 3) == {2, 5, 6}
    # a wide Beta(1,1) is informative with prob 1 - 2/(k+1); a sharp 0.5 beats it, a sharp 0.01 does not
    posterior = BetaPosterior(torch.tensor([1.0, 500.0, 1.0, 5.0]), torch.tensor([1.0, 500.0, 99.0, 5.0]))
    assert chosen("top_informative", posterior, 2) == {1, 3}
    assert chosen("top_informative", posterior, 3) == {0, 1, 3}


def test_thompson_target_picks_draws_closest_to_target():
    means = [0.05, 0.48, 0.9, 0.55, 0.3, 0.99, 0.62, 0.01]
    assert chosen("thompson_target", sharp(means), 3) == {1, 3, 6}
    assert chosen("thompson_target", sharp(means), 2, target=0.0) == {0, 7}


def test_thompson_target_draws_from_the_posterior():
    # identical wide posteriors: which candidate wins depends on the draw, so every one is picked sometimes
    posterior = BetaPosterior(torch.ones(6), torch.ones(6))
    counts = torch.zeros(6)
    for seed in range(180):
        counts[list(chosen("thompson_target", posterior, 1, seed=seed))] += 1
    assert counts.min() > 10


def test_thompson_threshold_prefers_the_interval():
    means = [0.1, 0.35, 0.5, 0.95, 0.65, 0.2, 0.85, 0.72]  # 0.2 is nearer the interval than 0.85
    # three draws inside [0.3, 0.7]; a batch of five fills up with the nearest outside (0.72, 0.2)
    assert chosen("thompson_threshold", sharp(means), 5) == {1, 2, 4, 7, 5}
    # more inside than needed: a random pick among the inside ones only, varying with the seed
    picks = [chosen("thompson_threshold", sharp(means), 2, seed=s) for s in range(60)]
    assert all(pick <= {1, 2, 4} for pick in picks)
    assert set().union(*picks) == {1, 2, 4}
    assert chosen("thompson_threshold", sharp(means), 2, low=0.9, high=1.0) == {3, 6}


def test_risk_picks_lowest_predicted_success():
    means = torch.tensor([0.9, 0.1, 0.5, 0.05, 0.7, 0.2])
    posterior = sharp(means)
    assert chosen("risk", posterior, 2) == {1, 3}
    assert chosen("risk", posterior, 3, use_sample=True) == {1, 3, 5}
    # the sampled variant follows the draw: with wide equal posteriors it varies with the seed
    wide = BetaPosterior(torch.ones(6), torch.ones(6))
    assert len({frozenset(chosen("risk", wide, 1, seed=s, use_sample=True)) for s in range(30)}) > 3


def test_uncertainty_picks_largest_variance():
    posterior = BetaPosterior(torch.tensor([1.0, 100.0, 2.0, 50.0, 1.0]), torch.tensor([1.0, 100.0, 2.0, 1.0, 30.0]))
    order = posterior.variance.argsort(descending=True)
    assert chosen("uncertainty", posterior, 2) == set(order[:2].tolist()) == {0, 2}


def test_uniform_is_uniform():
    n, batch, draws = 20, 5, 4000
    counts = torch.zeros(n)
    g = gen(1)
    uniform = rule("uniform")
    posterior = sharp(torch.linspace(0.01, 0.99, n))
    for _ in range(draws):
        counts[uniform.select(posterior, batch, g, 8)] += 1
    assert stats.chisquare(counts.numpy()).pvalue > 1e-3
    assert counts.sum() == draws * batch


def test_dynamic_sampling_orders_every_candidate():
    posterior = sharp(torch.linspace(0.01, 0.99, 12))
    picked = rule("dynamic_sampling").select(posterior, 4, gen(), 8)
    assert sorted(picked.tolist()) == list(range(12))
    again = rule("dynamic_sampling").select(posterior, 4, gen(5), 8)
    assert not torch.equal(picked, again)
    with pytest.raises(ValueError, match="batch_size 13"):
        rule("dynamic_sampling").select(posterior, 13, gen(), 8)


def test_ties_are_broken_at_random():
    posterior = PointMassPosterior(torch.full((10,), 0.5))
    counts = torch.zeros(10)
    for seed in range(300):
        counts[list(chosen("oracle", posterior, 3, seed=seed))] += 1
    assert stats.chisquare(counts.numpy()).pvalue > 1e-3


@pytest.mark.parametrize("name", RULES.names())
def test_every_rule_is_deterministic_under_the_generator(name):
    posterior = BetaPosterior(torch.rand(64, generator=gen(3)) * 5 + 0.5, torch.rand(64, generator=gen(4)) * 5 + 0.5)
    cls = get_acquisition_class(name)
    a = cls().select(posterior, 8, gen(11), 8)
    b = cls().select(posterior, 8, gen(11), 8)
    assert torch.equal(a, b)
    assert a.numel() == (64 if cls.rolls_out_all else 8)
    assert int(a.min()) >= 0 and int(a.max()) < 64


def test_nan_scores_are_an_error():
    posterior = PointMassPosterior(torch.tensor([0.5, float("nan"), 0.2]))
    with pytest.raises(ValueError, match="'risk': the posterior gave NaN"):
        rule("risk").select(posterior, 1, gen(), 8)


@pytest.mark.parametrize("num_prompts,num_candidates", [(10, 10), (100, 30), (100, 25), (1_000_000, 4096),
                                                        (10_000_000, 4096)])
def test_sample_candidates_distinct_and_in_range(num_prompts, num_candidates):
    ids = sample_candidates(num_prompts, num_candidates, gen(2))
    assert ids.dtype == torch.int64 and ids.shape == (num_candidates,)
    assert ids.unique().numel() == num_candidates
    assert int(ids.min()) >= 0 and int(ids.max()) < num_prompts
    assert torch.equal(ids, sample_candidates(num_prompts, num_candidates, gen(2)))


@pytest.mark.parametrize("num_candidates", [5, 60])  # the oversampling path and the randperm path
def test_sample_candidates_is_uniform(num_candidates):
    n, draws = 100, 3000
    counts = torch.zeros(n)
    pairs = torch.zeros(n)  # how often id 0 comes with each other id: uniform over subsets, not just marginals
    g = gen(7)
    for _ in range(draws):
        ids = sample_candidates(n, num_candidates, g)
        counts[ids] += 1
        if bool((ids == 0).any()):
            pairs[ids] += 1
    assert stats.chisquare(counts.numpy()).pvalue > 1e-3
    assert stats.chisquare(pairs[1:].numpy()).pvalue > 1e-3


def test_sample_candidates_errors():
    with pytest.raises(ValueError, match="pool is empty"):
        sample_candidates(0, 1, gen())
    with pytest.raises(ValueError, match="num_candidates 11 is larger than the pool of 10"):
        sample_candidates(10, 11, gen())
    with pytest.raises(ValueError, match="at least 1"):
        sample_candidates(10, 0, gen())
