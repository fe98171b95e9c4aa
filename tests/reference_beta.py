"""Independent inference for `beta`: the posterior of each prompt's p on a grid, swept eagerly.

No Beta algebra: each prompt's log density over p lives on a fine midpoint grid; forgetting is
the geometric mixture the program declares (log q <- lam log q + (1 - lam) log prior, applied
once per step that elapses), an outcome multiplies in p^s (1 - p)^(k - s), and every reported
quantity (mean, variance, interval ends, P(0 < S < k), the count pmf) is a sum over the grid.
"""

import numpy as np
import torch
from scipy import stats

from mpts.models import PromptPool
from mpts.models.registry import PREDICTORS

GRID = (np.arange(20_000) + 0.5) / 20_000  # midpoints on (0, 1)
LOG_P, LOG_Q = np.log(GRID), np.log1p(-GRID)


class GridBeta:
    """Eager grid posterior of the `beta` program for every prompt of the pool."""

    def __init__(self, n: int, prior_alpha: float, prior_beta: float, decay: float, decay_unobserved: bool):
        self.lam, self.decay_unobserved = decay, decay_unobserved
        self.log_prior = stats.beta(prior_alpha, prior_beta).logpdf(GRID)
        self.log_density = np.tile(self.log_prior, (n, 1))  # [n, G], unnormalised
        self.step = 0

    def temper(self, rows) -> None:
        self.log_density[rows] = self.lam * self.log_density[rows] + (1 - self.lam) * self.log_prior

    def advance(self, step: int) -> None:
        """With `decay_unobserved`, every prompt forgets once per step that elapses."""
        if self.decay_unobserved:
            for _ in range(step - self.step):
                self.temper(slice(None))
        self.step = step

    def prior_of_update(self, ids) -> np.ndarray:
        """The density the update at the current step starts from (MoPPS: tempered once, now)."""
        log_density = self.log_density[ids]
        if not self.decay_unobserved:
            log_density = self.lam * log_density + (1 - self.lam) * self.log_prior
        return log_density

    def observe(self, ids, successes, trials) -> None:
        log_density = self.prior_of_update(ids)
        self.log_density[ids] = log_density + successes[:, None] * LOG_P + (trials - successes)[:, None] * LOG_Q

    def summary(self, log_density: np.ndarray, k: int) -> dict[str, np.ndarray]:
        weights = np.exp(log_density - log_density.max(1, keepdims=True))
        weights /= weights.sum(1, keepdims=True)
        mean = weights @ GRID
        cdf = weights.cumsum(1)
        ends = {q: GRID[np.minimum((cdf < q).sum(1), GRID.size - 1)] for q in (0.05, 0.95)}
        counts = np.arange(k + 1)
        pmf = weights @ stats.binom.pmf(counts[None, :], k, GRID[:, None])  # [n, k + 1]
        return {"mean": mean, "variance": weights @ GRID**2 - mean**2, "lo90": ends[0.05], "hi90": ends[0.95],
                "p_informative": 1 - pmf[:, 0] - pmf[:, k], "pmf": pmf}


def produced_summary(posterior, k: int) -> dict[str, np.ndarray]:
    n = len(posterior)
    grid = torch.arange(k + 1, dtype=torch.float32).unsqueeze(1).expand(k + 1, n)
    lo, hi = posterior.interval(0.9)
    return {"mean": posterior.mean.double().numpy(), "variance": posterior.variance.double().numpy(),
            "lo90": lo.double().numpy(), "hi90": hi.double().numpy(),
            "p_informative": posterior.p_informative(k).double().numpy(),
            "pmf": posterior.log_prob_grid(grid, torch.full((n,), float(k))).exp().double().numpy().T}


TOLERANCE = {"mean": 1e-4, "variance": 1e-4, "lo90": 2e-4, "hi90": 2e-4, "p_informative": 1e-4, "pmf": 1e-4}
OPTION_SETS = ({"decay": 0.8}, {"decay": 0.8, "decay_unobserved": True}, {"decay": 0.8, "mopps_exact": True})


def check(name: str = "beta", steps: int = 8, n: int = 24, k: int = 8) -> None:
    """Production predictions at every step (before its outcome), and after long waits, equal the grid's."""
    for options in OPTION_SETS:
        cls = PREDICTORS.get(name)
        predictor = cls(PromptPool(n), cls.Options(**options))
        o = predictor.options
        grid = GridBeta(n, o.prior_alpha, o.prior_beta, o.decay, o.decay_unobserved)
        generator = torch.Generator().manual_seed(0)
        truth = torch.rand(n, generator=generator)
        every = torch.arange(n)

        def compare(step: int) -> None:
            grid.advance(step)
            # MoPPS-exact predicts the undecayed posterior, the default the prior its next update starts from
            expected = grid.summary(grid.log_density if o.mopps_exact else grid.prior_of_update(every.numpy()), k)
            produced = produced_summary(predictor.predict(every, step), k)
            for key, tolerance in TOLERANCE.items():
                gap = float(np.abs(produced[key] - expected[key]).max())
                assert gap < tolerance, f"{name} {options} step {step}: {key} differs from the grid by {gap:.2e}"

        for step in range(steps):
            compare(step)
            ids = torch.nonzero(torch.rand(n, generator=generator) < 0.4).squeeze(1)
            ids = ids[ids < n - 3]  # the last three prompts are never rolled out
            trials = torch.randint(1, 2 * k, (ids.shape[0],), generator=generator).float()
            successes = torch.binomial(trials, truth[ids], generator=generator)
            predictor.observe(ids, successes, trials, step)
            grid.observe(ids.numpy(), successes.double().numpy(), trials.double().numpy())
        compare(steps + 6)  # lazy catch-up over a long wait
