"""SuccessPosterior families against scipy and Monte Carlo."""

import numpy as np
import pytest
import torch
from scipy import stats

from mpts.models.posteriors import BetaPosterior, LogitNormalPosterior, PointMassPosterior


def test_beta_predictive_matches_scipy_betabinom():
    alpha = torch.tensor([0.5, 2.0, 7.0], dtype=torch.float64)
    beta = torch.tensor([0.5, 5.0, 1.5], dtype=torch.float64)
    posterior = BetaPosterior(alpha, beta)
    k = 8
    for s in range(k + 1):
        expected = stats.betabinom(k, alpha.numpy(), beta.numpy()).logpmf(s)
        got = posterior.log_prob(torch.full((3,), float(s), dtype=torch.float64), torch.full((3,), float(k), dtype=torch.float64))
        assert np.allclose(got.numpy(), expected, atol=1e-9)
    pmf = stats.betabinom(k, alpha.numpy(), beta.numpy())
    assert np.allclose(posterior.p_informative(k).numpy(), 1 - pmf.pmf(0) - pmf.pmf(k), atol=1e-9)
    lo, hi = posterior.interval(0.9)
    assert np.allclose(lo.numpy(), stats.beta(alpha.numpy(), beta.numpy()).ppf(0.05), atol=1e-8)
    assert np.allclose(hi.numpy(), stats.beta(alpha.numpy(), beta.numpy()).ppf(0.95), atol=1e-8)
    assert np.allclose(posterior.variance.numpy(), stats.beta(alpha.numpy(), beta.numpy()).var())


def test_sampling_is_deterministic_under_a_generator_and_has_the_right_moments():
    posterior = BetaPosterior(torch.tensor([2.0, 9.0]), torch.tensor([6.0, 3.0]))
    a = posterior.sample(20000, torch.Generator().manual_seed(3))
    b = posterior.sample(20000, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.allclose(a.mean(0), posterior.mean, atol=0.01)


def test_logit_normal_quadrature_matches_monte_carlo():
    posterior = LogitNormalPosterior(torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64),
                                     torch.tensor([0.3, 1.0, 2.0], dtype=torch.float64))
    draws = posterior.sample(400000, torch.Generator().manual_seed(0))
    assert torch.allclose(posterior.mean, draws.mean(0), atol=3e-3)
    assert torch.allclose(posterior.variance, draws.var(0), atol=3e-3)
    k, s = 6.0, torch.tensor([0.0, 3.0, 6.0], dtype=torch.float64)
    mc = torch.distributions.Binomial(k, probs=draws).log_prob(s).exp().mean(0)
    assert torch.allclose(posterior.log_prob(s, torch.full((3,), k, dtype=torch.float64)).exp(), mc, atol=3e-3)


def test_pit_is_uniform_when_the_predictive_is_right():
    generator = torch.Generator().manual_seed(1)
    n, k = 20000, 8
    alpha, beta = torch.full((n,), 2.0), torch.full((n,), 3.0)
    p = torch.distributions.Beta(alpha, beta).sample()
    successes = torch.binomial(torch.full((n,), float(k)), p, generator=generator)
    pit = BetaPosterior(alpha, beta).predictive_pit(successes, torch.full((n,), float(k)), generator)
    histogram = torch.histc(pit, bins=10, min=0, max=1) / n
    assert (histogram - 0.1).abs().max().item() < 0.015


def test_take_indexes_every_per_prompt_field():
    posterior = BetaPosterior(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0, 6.0]))
    sub = posterior.take(torch.tensor([2, 0]))
    assert torch.equal(sub.alpha, torch.tensor([3.0, 1.0]))
    assert len(sub) == 2


def test_point_mass_p_informative():
    posterior = PointMassPosterior(torch.tensor([0.0, 0.5, 1.0]))
    expected = torch.tensor([0.0, 1 - 2 * 0.5 ** 8, 0.0])
    assert torch.allclose(posterior.p_informative(8), expected, atol=1e-6)
