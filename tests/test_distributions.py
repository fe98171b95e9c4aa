"""Predictive distributions: exact against numerical integration, consistent with themselves,
and usable as Pyro likelihoods."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy import integrate, special, stats

from mpts.models.distributions import BinomialLogitNormal, ThreeStateCount, binomial_logit_normal
from mpts.models.hmm3 import ThreeStateMixturePosterior
from mpts.models.posteriors import BetaPosterior, LogitNormalPosterior

WIDE_CASES = [(4.0, 6.0, 8), (-3.0, 8.0, 8), (0.0, 6.0, 16), (2.0, 0.05, 8), (-1.0, 1.0, 8),
              (-5.0, 4.0, 8), (6.0, 10.0, 4), (0.5, 3.0, 64), (-8.0, 0.5, 32), (1.0, 12.0, 1)]


def _quad_pmf(s: int, n: int, loc: float, scale: float) -> float:
    """P(S = s) by adaptive quadrature over the logit, split where the integrand bends."""
    def integrand(f):
        return stats.norm.pdf(f, loc, scale) * stats.binom.pmf(s, n, special.expit(f))
    empirical = float(special.logit(min(max(s / n, 1e-6), 1 - 1e-6)))
    points = sorted({0.0, loc, empirical})
    lo, hi = min(loc - 14 * scale, empirical - 20), max(loc + 14 * scale, empirical + 20)
    points = [p for p in points if lo < p < hi]
    return integrate.quad(integrand, lo, hi, points=points, limit=1000, epsabs=0.0, epsrel=1e-12)[0]


@pytest.mark.parametrize("loc,scale,n", WIDE_CASES)
def test_logit_normal_log_prob_matches_numerical_integration(loc, scale, n):
    posterior = LogitNormalPosterior(torch.tensor([loc], dtype=torch.float64), torch.tensor([scale], dtype=torch.float64))
    for s in range(n + 1):
        exact = math.log(_quad_pmf(s, n, loc, scale))
        got = posterior.log_prob(torch.tensor([float(s)], dtype=torch.float64), torch.tensor([float(n)], dtype=torch.float64))
        assert abs(got.item() - exact) < 1e-3, (loc, scale, s, n, got.item(), exact)


def test_logit_normal_pmf_sums_to_one_and_moments_match_integration():
    loc = torch.tensor([4.0, -3.0, 0.0, 2.0], dtype=torch.float64)
    scale = torch.tensor([6.0, 8.0, 0.3, 12.0], dtype=torch.float64)
    posterior = LogitNormalPosterior(loc, scale)
    k = torch.full((4,), 8.0, dtype=torch.float64)
    pmf = posterior.log_prob(torch.arange(9, dtype=torch.float64).unsqueeze(1).expand(9, 4), k).exp()
    assert torch.allclose(pmf.sum(0), torch.ones(4, dtype=torch.float64), atol=1e-9)
    for i in range(4):
        m, sd = loc[i].item(), scale[i].item()
        mean = integrate.quad(lambda f: stats.norm.pdf(f, m, sd) * special.expit(f), m - 14 * sd, m + 14 * sd,
                              points=[0.0], limit=1000)[0]
        second = integrate.quad(lambda f: stats.norm.pdf(f, m, sd) * special.expit(f) ** 2, m - 14 * sd, m + 14 * sd,
                                points=[0.0], limit=1000)[0]
        assert abs(posterior.mean[i].item() - mean) < 1e-8
        assert abs(posterior.variance[i].item() - (second - mean ** 2)) < 1e-8


def test_p_informative_is_one_minus_the_ends_of_the_same_log_prob():
    loc = torch.tensor([-3.0, 4.0, 0.0, -1.0, 2.5])
    scale = torch.tensor([8.0, 6.0, 1.0, 0.05, 3.0])
    posterior = LogitNormalPosterior(loc, scale)
    k = torch.full((5,), 8.0)
    via_pmf = 1 - posterior.log_prob(torch.zeros(5), k).exp() - posterior.log_prob(k, k).exp()
    assert torch.allclose(posterior.p_informative(8), via_pmf, atol=1e-6)
    exact = 1 - _quad_pmf(0, 8, -3.0, 8.0) - _quad_pmf(8, 8, -3.0, 8.0)
    assert abs(exact - 0.2344) < 5e-5
    assert abs(posterior.p_informative(8)[0].item() - exact) < 1e-6


def test_quadrature_posterior_moments_match_integration():
    loc, scale, s, n = 1.0, 4.0, 0, 8
    log_marginal, mean, var = binomial_logit_normal(torch.tensor([loc], dtype=torch.float64),
                                                    torch.tensor([scale], dtype=torch.float64),
                                                    torch.tensor([float(s)]), torch.tensor([float(n)]), moments=True)
    z = _quad_pmf(s, n, loc, scale)
    weight = lambda f: stats.norm.pdf(f, loc, scale) * stats.binom.pmf(s, n, special.expit(f)) / z  # noqa: E731
    m1 = integrate.quad(lambda f: f * weight(f), loc - 14 * scale, loc + 14 * scale, points=[0.0], limit=1000)[0]
    m2 = integrate.quad(lambda f: f * f * weight(f), loc - 14 * scale, loc + 14 * scale, points=[0.0], limit=1000)[0]
    assert abs(log_marginal.item() - math.log(z)) < 1e-8
    assert abs(mean.item() - m1) < 1e-6 and abs(var.item() - (m2 - m1 ** 2)) < 1e-6


def test_quadrature_gradients_match_finite_differences():
    loc = torch.tensor([0.7, -2.0], dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([1.3, 5.0], dtype=torch.float64, requires_grad=True)
    s, n = torch.tensor([3.0, 0.0]), torch.tensor([8.0, 8.0])
    assert torch.autograd.gradcheck(lambda a, b: binomial_logit_normal(a, b, s, n)[0], (loc, scale), atol=1e-6)


def test_beta_posterior_predictive_is_pyros_beta_binomial():
    alpha, beta = torch.tensor([0.5, 2.0, 7.0]), torch.tensor([0.5, 5.0, 1.5])
    s, n = torch.tensor([0.0, 3.0, 8.0]), torch.full((3,), 8.0)
    expected = dist.BetaBinomial(alpha, beta, n).log_prob(s)
    assert torch.equal(BetaPosterior(alpha, beta).log_prob(s, n), expected)
    pmf = stats.betabinom(8, alpha.double().numpy(), beta.double().numpy())
    assert np.allclose(BetaPosterior(alpha, beta).p_informative(8).numpy(), 1 - pmf.pmf(0) - pmf.pmf(8), atol=1e-6)


def _three_state(n=4):
    probs = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3], [0.05, 0.9, 0.05], [0.3, 0.3, 0.4]], dtype=torch.float64)[:n]
    return ThreeStateCount(probs, 1.5, 2.5, torch.full((n,), 8.0, dtype=torch.float64))


def test_three_state_count_is_the_binomial_mixture_of_its_three_rate_states():
    d = _three_state()
    pmf = d.log_prob(torch.arange(9, dtype=torch.float64).unsqueeze(1).expand(9, 4)).exp()
    assert torch.allclose(pmf.sum(0), torch.ones(4, dtype=torch.float64), atol=1e-12)
    bb = torch.from_numpy(stats.betabinom(8, 1.5, 2.5).pmf(np.arange(9))).unsqueeze(1)
    w = d.state_probs
    assert torch.allclose(pmf[0], w[:, 0] + w[:, 1] * bb[0]) and torch.allclose(pmf[8], w[:, 2] + w[:, 1] * bb[8])
    assert torch.allclose(pmf[1:8], w[:, 1] * bb[1:8])
    posterior = ThreeStateMixturePosterior(d.state_probs, 1.5, 2.5)
    assert torch.allclose(posterior.p_informative(8), 1 - pmf[0] - pmf[8], atol=1e-6)
    unchecked = ThreeStateCount(d.state_probs, 1.5, 2.5, d.total_count, validate_args=False)
    assert unchecked.log_prob(torch.tensor([9.0, -1.0, 2.5, 3.0], dtype=torch.float64))[:3].eq(-math.inf).all()


@pytest.mark.parametrize("make", [
    lambda: dist.BetaBinomial(torch.tensor([2.0, 0.7]), torch.tensor([3.0, 0.9]), torch.tensor([8.0, 8.0])),
    lambda: BinomialLogitNormal(torch.tensor([8.0, 8.0]), torch.tensor([0.5, -2.0]), torch.tensor([1.0, 4.0])),
    lambda: _three_state(2),
], ids=["beta_binomial", "binomial_logit_normal", "three_state"])
def test_predictive_is_a_pyro_likelihood_whose_samples_follow_its_pmf(make):
    d = make()
    pyro.set_rng_seed(0)
    draws = d.sample((40000,))
    pmf = d.log_prob(torch.arange(9, dtype=d.sample().dtype).unsqueeze(1).expand(9, 2)).exp()
    frequencies = torch.stack([(draws == s).double().mean(0) for s in range(9)])
    assert (frequencies - pmf.double()).abs().max() < 0.012

    observed = draws[0]
    def model():
        with pyro.plate("prompts", 2):
            pyro.sample("s", d, obs=observed)
    trace = pyro.poutine.trace(model).get_trace()
    assert torch.allclose(trace.log_prob_sum(), d.log_prob(observed).sum())


# -- conformance in the style of Pyro's own distribution tests --------------------------------------
COUNT_DISTRIBUTIONS = {
    "binomial_logit_normal": lambda: BinomialLogitNormal(torch.tensor([8.0, 5.0, 8.0]), torch.tensor([0.5, -2.0, 6.0]),
                                                         torch.tensor([1.0, 4.0, 8.0]), validate_args=False),
    "three_state": lambda: ThreeStateCount(
        torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3], [1.0, 0.0, 0.0]], dtype=torch.float64), 1.5, 2.5,
        torch.tensor([8.0, 5.0, 8.0], dtype=torch.float64), validate_args=False),
}


def _pmf_table(d, top=8):
    counts = torch.arange(top + 1, dtype=d.mean.dtype).unsqueeze(1).expand(top + 1, *d.batch_shape)
    return d.log_prob(counts).exp().double()


@pytest.mark.parametrize("name", sorted(COUNT_DISTRIBUTIONS))
def test_pmf_sums_to_one_and_mean_variance_are_its_moments(name):
    d = COUNT_DISTRIBUTIONS[name]()
    pmf = _pmf_table(d)
    assert torch.allclose(pmf.sum(0), torch.ones(3, dtype=torch.float64), atol=1e-9)
    counts = torch.arange(9, dtype=torch.float64).unsqueeze(1)
    mean = (pmf * counts).sum(0)
    assert torch.allclose(d.mean.double(), mean, atol=1e-5)
    assert torch.allclose(d.variance.double(), (pmf * (counts - mean).square()).sum(0), atol=1e-4)


@pytest.mark.parametrize("name", sorted(COUNT_DISTRIBUTIONS))
def test_sample_frequencies_pass_a_chi_square_test_against_the_pmf(name):
    d = COUNT_DISTRIBUTIONS[name]()
    torch.manual_seed(1)
    draws = d.sample((4000,))
    assert draws.shape == (4000, 3)
    pmf = _pmf_table(d)
    for i in range(3):
        observed = torch.bincount(draws[:, i].long(), minlength=9).double()
        expected = 4000 * pmf[:, i]
        assert observed[expected == 0].sum() == 0, "a draw outside the support"
        keep = expected > 0
        if int(keep.sum()) < 2:  # a point mass: the support check above is the whole test
            continue
        statistic = float(((observed[keep] - expected[keep]).square() / expected[keep]).sum())
        assert stats.chi2.sf(statistic, int(keep.sum()) - 1) > 1e-3, (name, i, statistic)


@pytest.mark.parametrize("name", sorted(COUNT_DISTRIBUTIONS))
def test_batch_shapes_and_expand_keep_the_parameters_and_the_validation_flag(name):
    d = COUNT_DISTRIBUTIONS[name]()
    assert d.batch_shape == (3,) and d.event_shape == ()
    assert d.sample((5,)).shape == (5, 3) and d.sample().shape == (3,)
    wide = d.expand((2, 3))
    assert wide.batch_shape == (2, 3) and wide.sample((4,)).shape == (4, 2, 3)
    assert wide._validate_args is False
    assert torch.allclose(wide.mean, d.mean.expand(2, 3)) and torch.allclose(wide.variance, d.variance.expand(2, 3))
    checked = type(d).__new__(type(d))
    checked.__dict__.update(d.__dict__)
    checked._validate_args = True
    assert checked.expand((2, 3))._validate_args is True
    value = torch.tensor([3.0, 0.0, 8.0], dtype=d.mean.dtype)
    assert torch.allclose(wide.log_prob(value), d.log_prob(value).expand(2, 3))


@pytest.mark.parametrize("name", sorted(COUNT_DISTRIBUTIONS))
def test_validation_rejects_values_outside_the_support(name):
    d = COUNT_DISTRIBUTIONS[name]()
    checked = type(d).__new__(type(d))
    checked.__dict__.update(d.__dict__)
    checked._validate_args = True
    with pytest.raises(ValueError):
        checked.log_prob(torch.tensor([9.0, 0.0, 1.0], dtype=d.mean.dtype))
    with pytest.raises(ValueError):
        checked.log_prob(torch.tensor([2.5, 0.0, 1.0], dtype=d.mean.dtype))


def test_validation_rejects_bad_parameters():
    with pytest.raises(ValueError):
        BinomialLogitNormal(torch.tensor([8.0]), torch.tensor([0.0]), torch.tensor([-1.0]), validate_args=True)
    with pytest.raises(ValueError):
        ThreeStateCount(torch.tensor([[0.5, 0.6, 0.2]]), 1.0, 1.0, torch.tensor([8.0]), validate_args=True)


def test_wide_float32_logit_normal_interval_covers_its_level_of_draws():
    """loc 6, scale 8 in float32: sigmoid rounds every f > 17 to 1.0; the interval and the draws
    must still agree (a "90%" interval holding 90% of the draws, not 94.9%)."""
    posterior = LogitNormalPosterior(torch.tensor([6.0]), torch.tensor([8.0]))
    draws = posterior.sample(100000, torch.Generator().manual_seed(0))[:, 0]
    for level in (0.5, 0.9):
        lo, hi = posterior.interval(level)
        assert float(hi) < 1.0
        inside = float(((draws >= lo) & (draws <= hi)).double().mean())
        assert abs(inside - level) < 3 * math.sqrt(level * (1 - level) / 100000) + 1e-3, (level, inside)
    assert float((draws == 1.0).double().mean()) < 1e-3
