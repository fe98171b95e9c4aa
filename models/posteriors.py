"""Concrete `SuccessPosterior` families shared by the predictors.

- `BetaPosterior`: conjugate; Beta-Binomial predictive in closed form.
- `LogitNormalPosterior`: p = sigmoid(f), f ~ Normal(loc, scale); its predictive is
  `distributions.BinomialLogitNormal`, and mean, variance and P(0 < S < k) are read off that
  same pmf (for GP and latent-variable predictors).
- `PointMassPosterior`: p known exactly (the simulator's oracle).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from scipy import special
from torch import Tensor

from .base import SuccessPosterior
from .distributions import BinomialLogitNormal, beta_binomial_log_prob, binomial_logit_normal, log_beta


@dataclasses.dataclass(frozen=True)
class BetaPosterior(SuccessPosterior):
    alpha: Tensor
    beta: Tensor

    @property
    def mean(self) -> Tensor:
        return self.alpha / (self.alpha + self.beta)

    @property
    def variance(self) -> Tensor:
        total = self.alpha + self.beta
        return self.alpha * self.beta / (total.square() * (total + 1))

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
        # NumPy's Beta sampler, seeded from the torch generator: about 4x faster than torch's
        # gamma-ratio path here (Thompson draws sit on the per-step hot path).
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        rng = np.random.default_rng(seed)
        draws = rng.beta(self.alpha.double().numpy(), self.beta.double().numpy(),
                         size=(num_samples,) + tuple(self.alpha.shape))
        return torch.from_numpy(draws).to(self.alpha.dtype)

    def log_prob(self, successes: Tensor, trials: Tensor) -> Tensor:
        return beta_binomial_log_prob(self.alpha, self.beta, successes.to(self.alpha.dtype),
                                      trials.to(self.alpha.dtype))

    def log_prob_grid(self, successes: Tensor, trials: Tensor) -> Tensor:
        return self.log_prob(successes, trials.expand_as(successes))

    def p_informative(self, k) -> Tensor:
        k = torch.as_tensor(k, dtype=self.alpha.dtype)
        base = log_beta(self.alpha, self.beta)
        p_zero = (log_beta(self.alpha, self.beta + k) - base).exp()  # BetaBinomial(0; k) in closed form
        p_all = (log_beta(self.alpha + k, self.beta) - base).exp()
        return (1.0 - p_zero - p_all).clamp(0.0, 1.0)

    def interval(self, level: float) -> tuple[Tensor, Tensor]:
        tail = (1.0 - level) / 2
        a, b = self.alpha.double().numpy(), self.beta.double().numpy()
        lo = special.betaincinv(a, b, tail)
        hi = special.betaincinv(a, b, 1.0 - tail)
        return torch.from_numpy(lo).to(self.alpha.dtype), torch.from_numpy(hi).to(self.alpha.dtype)


@dataclasses.dataclass(frozen=True)
class LogitNormalPosterior(SuccessPosterior):
    """p = sigmoid(f), f ~ Normal(loc, scale), per prompt."""

    loc: Tensor
    scale: Tensor

    def __len__(self) -> int:  # not the base's len(mean): that is a quadrature per candidate
        return int(self.loc.shape[0])

    def _moment(self, power: int) -> Tensor:
        """E[p**power] = P(S = power | power trials): the predictive's own integral."""
        count = torch.full_like(self.loc, float(power))
        return binomial_logit_normal(self.loc, self.scale, count, count)[0].exp()

    @property
    def mean(self) -> Tensor:
        return self._moment(1)

    @property
    def variance(self) -> Tensor:
        return (self._moment(2) - self._moment(1).square()).clamp_min(0.0)

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
        """Float64 draws: in float32 sigmoid(f) is exactly 1.0 for every f > 17, so a wide belief
        would put a finite share of its draws on the boundary (and on `interval`'s end)."""
        eps = torch.randn((num_samples,) + tuple(self.loc.shape), generator=generator, dtype=self.loc.dtype)
        return torch.sigmoid(self.loc.double() + self.scale.double() * eps.double())

    def log_prob(self, successes: Tensor, trials: Tensor) -> Tensor:
        return BinomialLogitNormal(trials.to(self.loc.dtype), self.loc, self.scale, validate_args=False).log_prob(
            successes.to(self.loc.dtype))

    def log_prob_grid(self, successes: Tensor, trials: Tensor) -> Tensor:
        return self.log_prob(successes, trials)  # broadcasts [m, n] against [n]

    def p_informative(self, k) -> Tensor:
        """1 - P(S = 0) - P(S = k) of `log_prob` (both ends in one quadrature pass)."""
        k = torch.as_tensor(k, dtype=self.loc.dtype).expand_as(self.loc)
        ends = self.log_prob(torch.stack([torch.zeros_like(k), k]), k).exp()
        return (1.0 - ends[0] - ends[1]).clamp(0.0, 1.0)

    def interval(self, level: float) -> tuple[Tensor, Tensor]:
        """Quantiles of f mapped through sigmoid in float64 (as `sample`'s draws), so the ends
        stay inside (0, 1) where float32 would round them onto 0 or 1."""
        z = float(special.ndtri(0.5 + level / 2))
        loc, scale = self.loc.double(), self.scale.double()
        return torch.sigmoid(loc - z * scale), torch.sigmoid(loc + z * scale)


@dataclasses.dataclass(frozen=True)
class PointMassPosterior(SuccessPosterior):
    """p known exactly: the simulator's truth, used by the oracle rule."""

    p: Tensor

    @property
    def mean(self) -> Tensor:
        return self.p

    @property
    def variance(self) -> Tensor:
        return torch.zeros_like(self.p)

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
        return self.p.unsqueeze(0).expand(num_samples, -1).clone()

    def log_prob(self, successes: Tensor, trials: Tensor) -> Tensor:
        return torch.distributions.Binomial(trials.to(self.p.dtype), probs=self.p).log_prob(successes.to(self.p.dtype))

    def interval(self, level: float) -> tuple[Tensor, Tensor]:
        return self.p.clone(), self.p.clone()
