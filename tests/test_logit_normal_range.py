"""BinomialLogitNormal's integration range (Newton's method, `_integration_range`) holds the mass at
extremes: very wide and very narrow logit beliefs, many trials, all-fail and all-pass counts."""

import itertools

import torch

from mpts.models.distributions import _integration_range, binomial_logit_normal


def extreme_grid(n: int):
    locs, scales = [-30.0, -4.0, 0.0, 2.5, 30.0], [0.003, 0.3, 3.0, 30.0, 54.0]
    rows = list(itertools.product(locs, scales))
    loc, scale = (torch.tensor(column, dtype=torch.float64) for column in zip(*rows))
    return loc, scale, torch.full_like(loc, float(n))


def test_the_pmf_sums_to_one_at_extremes():
    for n in (1, 8, 50, 1000):
        loc, scale, trials = extreme_grid(n)
        total = sum(binomial_logit_normal(loc, scale, torch.full_like(loc, float(s)), trials)[0].exp()
                    for s in range(n + 1))
        assert torch.allclose(total, torch.ones_like(total), atol=1e-9, rtol=0), (n, (total - 1).abs().max())


def test_the_range_encloses_the_mass_and_is_tight():
    """Ends at ~e^-36 of the peak: the log integrand there is at least 34 below the grid's maximum
    (enclosing) and not more than ~60 below (tight: not a range many times too wide)."""
    for n, s in ((8, 0), (8, 3), (8, 8), (10000, 9999), (10000, 17)):
        loc, scale, trials = extreme_grid(n)
        successes = torch.full_like(loc, float(s))
        lo, hi = _integration_range(loc, scale, successes, trials)
        grid = lo.unsqueeze(-1) + (hi - lo).unsqueeze(-1) * torch.linspace(0, 1, 4001, dtype=torch.float64)
        log_g = (-0.5 * ((grid - loc.unsqueeze(-1)) / scale.unsqueeze(-1)).square()
                 + s * torch.nn.functional.logsigmoid(grid) + (n - s) * torch.nn.functional.logsigmoid(-grid))
        drop = log_g.max(-1).values.unsqueeze(-1) - log_g[..., [0, -1]]
        assert bool((drop > 34).all()) and bool((drop < 60).all()), (n, s, drop.min(), drop.max())
