"""Every registered predictor's predictions agree with their own predictive distribution, and
beta's and hmm3's are calibrated on their own generative model (simulation-based calibration).

Conformance (per predictor, on a posterior made after updates with forgetting and waiting): the
count pmf sums to 1; mean and variance of p are the pmf's binomial moments (E[S] / K and
E[S(S-1)] / (K(K-1)) - mean^2); `p_informative(K)` = 1 - P(0) - P(K); Binomial(K, sample())
follows the pmf (chi-square); `interval` ends are quantiles of the same draws; the PIT of counts
drawn from the pmf is uniform.
"""

import math

import numpy as np
import pytest
import torch
from scipy import special, stats

from mpts.models import PromptPool
from mpts.models.registry import PREDICTORS
from test_programs import SMALL, history

K = 8
DRAWS = 6000


def posterior_after_history(name):
    generator = torch.Generator().manual_seed(0)
    pool = PromptPool(size=40, features=torch.randn(40, 6, generator=generator), clusters=torch.arange(40) % 4)
    truth = torch.rand(40, generator=generator)
    cls = PREDICTORS.get(name)
    predictor = cls(pool, cls.Options(**SMALL.get(name, {})), seed=0)
    history(predictor, truth, generator)
    ids = torch.cat([torch.arange(0, 6), torch.arange(20, 34), torch.arange(36, 40)])  # waited, caught up, never seen
    return predictor.predict(ids, 7)


def count_pmf(posterior, k=K):
    n = len(posterior)
    grid = torch.arange(k + 1, dtype=torch.float32).unsqueeze(1).expand(k + 1, n)
    return posterior.log_prob_grid(grid, torch.full((n,), float(k))).exp().double()  # [k + 1, n]


@pytest.fixture(scope="module", params=PREDICTORS.names())
def posterior(request):
    return posterior_after_history(request.param)


def test_pmf_sums_to_one_and_mean_variance_p_informative_are_read_off_it(posterior):
    pmf = count_pmf(posterior)
    assert torch.allclose(pmf.sum(0), torch.ones(pmf.shape[1], dtype=torch.float64), atol=1e-5)
    s = torch.arange(K + 1, dtype=torch.float64).unsqueeze(1)
    mean = (pmf * s).sum(0) / K
    second = (pmf * s * (s - 1)).sum(0) / (K * (K - 1))
    torch.testing.assert_close(posterior.mean.double(), mean, atol=1e-4, rtol=0)
    torch.testing.assert_close(posterior.variance.double(), second - mean.square(), atol=1e-4, rtol=0)
    torch.testing.assert_close(posterior.p_informative(K).double(), (1 - pmf[0] - pmf[K]).clamp(0, 1), atol=1e-5, rtol=0)


def test_binomial_counts_of_samples_follow_the_pmf(posterior):
    generator = torch.Generator().manual_seed(1)
    draws = posterior.sample(DRAWS, generator)
    assert draws.shape == (DRAWS, len(posterior))
    assert torch.equal(draws[:5], posterior.sample(DRAWS, torch.Generator().manual_seed(1))[:5])
    counts = torch.binomial(torch.full(draws.shape, float(K), dtype=torch.float64), draws.double(),
                            generator=torch.Generator().manual_seed(2))
    pmf = count_pmf(posterior)
    statistic, dof = 0.0, 0
    for i in range(len(posterior)):
        observed = torch.bincount(counts[:, i].long(), minlength=K + 1).double()
        expected = DRAWS * pmf[:, i]
        pooled = expected < 5  # tiny cells merged into one
        observed = torch.cat([observed[~pooled], observed[pooled].sum().view(1)])
        expected = torch.cat([expected[~pooled], expected[pooled].sum().view(1)])
        assert observed[expected < 1e-9].sum() <= 1, f"prompt {i}: draws where the pmf has no mass"
        keep = expected > 1e-9
        statistic += float(((observed[keep] - expected[keep]).square() / expected[keep]).sum())
        dof += int(keep.sum()) - 1
    assert stats.chi2.sf(statistic, max(dof, 1)) > 1e-3, (statistic, dof)


def test_interval_ends_are_quantiles_of_the_samples(posterior):
    draws = posterior.sample(DRAWS, torch.Generator().manual_seed(3)).double()
    tolerance = 4 * math.sqrt(0.25 / DRAWS)
    for level in (0.5, 0.9):
        tail = (1 - level) / 2
        for end, mass in zip(posterior.interval(level), (tail, 1 - tail)):
            end = end.double()
            assert (end >= 0).all() and (end <= 1).all()
            # a quantile q of a law with atoms: P(X < q) <= mass <= P(X <= q)
            assert ((draws < end).double().mean(0) <= mass + tolerance).all(), (level, mass)
            assert ((draws <= end).double().mean(0) >= mass - tolerance).all(), (level, mass)


def test_pit_of_counts_drawn_from_the_pmf_is_uniform(posterior):
    generator = torch.Generator().manual_seed(4)
    pmf = count_pmf(posterior)
    n = len(posterior)
    pits = []
    for _ in range(30):
        successes = torch.multinomial(pmf.T, 1, generator=generator).squeeze(1).float()
        pits.append(posterior.predictive_pit(successes, torch.full((n,), float(K)), generator))
    assert stats.kstest(torch.cat(pits).double().numpy(), "uniform").pvalue > 1e-3


# -- simulation-based calibration on each model's own generative process, forgetting on ----------
def randomized_rank(cdf_below, cdf_at, generator):
    """F(x-) + U (F(x) - F(x-)): uniform when x is drawn from the law F (atoms included)."""
    u = torch.rand(cdf_at.shape, generator=generator, dtype=torch.float64)
    return cdf_below + u * (cdf_at - cdf_below)


def assert_calibrated(ranks, covered, worlds: bool = False):
    """Ranks uniform (chi-square over 10 bins); 50% / 90% coverage within 3 standard errors.

    `worlds`: each list entry is one independently drawn world whose members share its error (a
    GP's prompts, a VAE's codes): the worlds, not the members, are the independent units. The
    coverage standard error is then the cluster-robust one (between-world spread of the hits) and
    the chi-square is divided by the bins' mean design effect (Rao & Scott 1981), so a calibrated
    predictor fails 3 standard errors as rarely as with independent ranks."""
    units = [r.numpy() for r in ranks]
    pooled = np.concatenate(units)
    observed = np.histogram(pooled, bins=10, range=(0, 1))[0]
    chi2 = stats.chisquare(observed).statistic
    if worlds:
        in_bin = [np.histogram(u, bins=10, range=(0, 1))[0] for u in units]
        chi2 /= float(np.mean(design_effect(np.array(in_bin), np.array([len(u) for u in units]))))
    assert stats.chi2.sf(chi2, 9) > 1e-3, observed
    for level, hits in covered.items():
        counts = np.array([float(h.sum()) for h in hits])
        sizes = np.array([h.numel() for h in hits], dtype=float)
        rate = counts.sum() / sizes.sum()
        variance = level * (1 - level) / sizes.sum()
        if worlds:
            variance = variance * float(design_effect(counts[:, None], sizes, level)[0])
        assert abs(rate - level) < 3 * math.sqrt(variance), (level, rate, sizes.sum())


def design_effect(counts, sizes, share=None):
    """Per column of `counts` (units x categories): the cluster-robust variance of the pooled share
    (ratio estimator over units) over the binomial one; `share` the binomial's p (default: pooled)."""
    total = sizes.sum()
    pooled = counts.sum(0) / total
    share = pooled if share is None else np.full_like(pooled, share)
    units = len(sizes)
    robust = units / (units - 1) * ((counts - pooled * sizes[:, None]) ** 2).sum(0) / total**2
    return robust / (share * (1 - share) / total)


@pytest.mark.parametrize("options", [{"decay": 0.8}, {"decay": 0.8, "decay_unobserved": True}])
def test_beta_is_calibrated_on_its_own_generative_model(options):
    """Each step p is drawn from the prior the declared program conditions on (the decayed
    posterior), s ~ Binomial(k, p); the prediction made before must rank p uniformly."""
    cls = PREDICTORS.get("beta")
    n, generator = 800, torch.Generator().manual_seed(5)
    torch.manual_seed(5)  # the Beta draws below
    predictor = cls(PromptPool(n), cls.Options(**options))
    ranks, covered = [], {0.5: [], 0.9: []}
    for step in range(12):
        ids = torch.nonzero(torch.rand(n, generator=generator) < 0.5).squeeze(1)
        trials = torch.full((ids.shape[0],), float(K))
        posterior = predictor.predict(ids, step)
        prior_alpha, prior_beta = predictor.program(ids, torch.zeros_like(trials), trials, step).args[:2]
        p = torch.distributions.Beta(prior_alpha.double(), prior_beta.double()).sample()
        successes = torch.binomial(trials.double(), p, generator=generator).float()
        rank = torch.from_numpy(special.betainc(posterior.alpha.double().numpy(), posterior.beta.double().numpy(),
                                                p.numpy()))
        ranks.append(rank)
        for level in covered:
            lo, hi = posterior.interval(level)
            covered[level].append(((p >= lo.double()) & (p <= hi.double())).double())
        predictor.observe(ids, successes, trials, step)
    assert_calibrated(ranks, covered)


@pytest.mark.parametrize("name", ["hmm3", "hmm3_pooled"])
def test_hmm3_is_calibrated_on_its_own_generative_model(name):
    """Transition rows ~ Dirichlet(1), a chain of states, p = 0 / Beta(2, 3) / 1 by state,
    s ~ Binomial(k, p); the prediction made before each step (default forgetting) must rank both
    p and s uniformly and its 50% / 90% regions for p hold 50% / 90% of the draws. hmm3's rows are
    per prompt; hmm3_pooled's are drawn around their cluster's shared matrix M_c (its pooled prior's
    story): P_i ~ Dirichlet(pool_strength * M_c), M_c rows ~ Dirichlet(1)."""
    cls = PREDICTORS.get(name)
    n, generator = 1000, torch.Generator().manual_seed(6)
    torch.manual_seed(6)
    clusters = torch.arange(n) % 4
    if name == "hmm3_pooled":
        shared = torch.distributions.Dirichlet(torch.ones(3)).sample((4, 3))[clusters]
        transitions = torch.distributions.Dirichlet(cls.Options().pool_strength * shared).sample()
    else:
        transitions = torch.distributions.Dirichlet(torch.ones(3)).sample((n, 3))
    state = torch.randint(0, 3, (n,), generator=generator)
    predictor = cls(PromptPool(n, clusters=clusters), cls.Options())
    ranks, count_ranks, covered = [], [], {0.5: [], 0.9: []}
    for step in range(8):
        state = torch.multinomial(transitions[torch.arange(n), state], 1, generator=generator).squeeze(1)
        ids = torch.nonzero(torch.rand(n, generator=generator) < 0.5).squeeze(1)
        partial = torch.distributions.Beta(2.0, 3.0).sample((ids.shape[0],)).double()
        p = torch.where(state[ids] == 0, 0.0, torch.where(state[ids] == 2, 1.0, partial))
        trials = torch.full((ids.shape[0],), float(K))
        successes = torch.binomial(trials.double(), p, generator=generator).float()
        posterior = predictor.predict(ids, step)
        if step >= 2:  # once the state's Beta has data
            w = posterior.state_probs.double()
            inside = torch.from_numpy(special.betainc(posterior.a, posterior.b, p.numpy()))
            below = w[:, 0] * (p > 0) + w[:, 1] * inside
            at = below + w[:, 0] * (p == 0) + w[:, 2] * (p == 1)
            rank = randomized_rank(below, at, generator)
            ranks.append(rank)
            count_ranks.append(posterior.predictive_pit(successes, trials, generator).double())
            for level in covered:
                covered[level].append(((rank >= (1 - level) / 2) & (rank <= (1 + level) / 2)).double())
        predictor.observe(ids, successes, trials, step)
    assert_calibrated(ranks, covered)
    assert_calibrated(count_ranks, {})
