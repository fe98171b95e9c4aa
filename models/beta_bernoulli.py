"""Beta-Bernoulli risk predictor (MoPPS), as a Pyro program with a conjugate fast path.

Generative model for one step's batch (prior = last posterior, decayed toward the base prior):

    p_i ~ Beta(alpha'_i, beta'_i)      alpha' = lam * alpha + (1 - lam) * alpha0   (forgetting)
    s_i ~ Binomial(k_i, p_i)

The posterior is Beta(alpha' + s, beta' + k - s): `_observe` applies it in closed form.
`model`/`guide` are the same program for SVI; tests check SVI agrees with the closed form.

With `decay_unobserved`, prompts not rolled out also decay toward the prior every step. That is
done lazily: each prompt remembers the step of its last update and is brought up to date with
lam**delta when it is next predicted or observed, so a step never sweeps the whole pool.
"""

from __future__ import annotations

from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pydantic import Field
from torch import Tensor

from .base import PredictorOptions, PromptPool, RiskPredictor
from .posteriors import BetaPosterior
from mpts.inference.forgetting import decay_concentration


class BetaBernoulliOptions(PredictorOptions):
    decay: float = Field(0.9, ge=0.0, le=1.0, description="lam: weight kept on the old posterior per update")
    prior_alpha: float = Field(1.0, gt=0.0)
    prior_beta: float = Field(1.0, gt=0.0)
    decay_unobserved: bool = Field(False, description="also decay prompts that were not rolled out")


def model(prior_alpha: Tensor, prior_beta: Tensor, successes: Tensor, trials: Tensor) -> None:
    with pyro.plate("prompts", prior_alpha.shape[0]):
        p = pyro.sample("p", dist.Beta(prior_alpha, prior_beta))
        pyro.sample("s", dist.Binomial(trials, p), obs=successes)


def guide(prior_alpha: Tensor, prior_beta: Tensor, successes: Tensor, trials: Tensor) -> None:
    positive = dist.constraints.positive
    q_alpha = pyro.param("q_alpha", prior_alpha.clone(), constraint=positive)
    q_beta = pyro.param("q_beta", prior_beta.clone(), constraint=positive)
    with pyro.plate("prompts", prior_alpha.shape[0]):
        pyro.sample("p", dist.Beta(q_alpha, q_beta))


class BetaBernoulli(RiskPredictor):
    name = "beta"
    Options = BetaBernoulliOptions

    def __init__(self, pool: PromptPool, options: BetaBernoulliOptions | None = None, seed: int = 0):
        super().__init__(pool, options, seed)
        o = self.options
        self.alpha = torch.full((self.num_prompts,), o.prior_alpha, dtype=torch.float32)
        self.beta = torch.full((self.num_prompts,), o.prior_beta, dtype=torch.float32)
        # int32 step of each prompt's last update; only kept when unobserved prompts decay.
        self.last_step = torch.zeros(self.num_prompts, dtype=torch.int32) if o.decay_unobserved else None

    def _current(self, ids: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """(alpha, beta) of these prompts as of `step`, lazy decay of waiting steps applied."""
        alpha, beta = self.alpha[ids], self.beta[ids]
        if self.last_step is not None:
            waited = (step - self.last_step[ids]).clamp_min(0)
            alpha = decay_concentration(alpha, self.options.prior_alpha, self.options.decay, waited)
            beta = decay_concentration(beta, self.options.prior_beta, self.options.decay, waited)
        return alpha, beta

    def _predict(self, ids: Tensor, step: int) -> BetaPosterior:
        return BetaPosterior(*self._current(ids, step))

    def decayed_prior(self, ids: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """The prior for this step's update: the posterior, tempered toward the base prior."""
        o = self.options
        alpha, beta = self._current(ids, step)
        if self.last_step is None:  # MoPPS: only rolled-out prompts decay, once per update
            alpha = decay_concentration(alpha, o.prior_alpha, o.decay)
            beta = decay_concentration(beta, o.prior_beta, o.decay)
        # With lazy decay the waited steps (including this one's) are already applied.
        return alpha, beta

    def _observe(self, ids: Tensor, successes: Tensor, trials: Tensor, step: int) -> dict[str, Any]:
        prior_alpha, prior_beta = self.decayed_prior(ids, step)
        self.alpha[ids] = prior_alpha + successes
        self.beta[ids] = prior_beta + (trials - successes)
        if self.last_step is not None:
            self.last_step[ids] = step  # the decay due at this step is in the prior above
        return {}

    def _state(self) -> dict[str, Any]:
        state = {"alpha": self.alpha.clone(), "beta": self.beta.clone()}
        if self.last_step is not None:
            state["last_step"] = self.last_step.clone()
        return state

    def _load_state(self, state: dict[str, Any]) -> None:
        self.alpha = state["alpha"].clone()
        self.beta = state["beta"].clone()
        if self.last_step is not None:
            self.last_step = state["last_step"].clone()
