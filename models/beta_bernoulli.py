"""Beta-Bernoulli risk predictor (MoPPS), as a Pyro program with a conjugate fast path.

Generative model for one step's batch (prior = last posterior, decayed toward the base prior):

    p_i ~ Beta(alpha'_i, beta'_i)      alpha' = lam * alpha + (1 - lam) * alpha0   (forgetting)
    s_i ~ Binomial(k_i, p_i)

The posterior is Beta(alpha' + s, beta' + k - s): `_observe` applies it in closed form with
Pyro's `Beta.conjugate_update`. `predict` returns the decayed prior p_i ~ Beta(alpha', beta') that
the prompt's next update starts from (`mopps_exact: true`: the undecayed posterior, as MoPPS). `program()` declares `model` and a `Guide` for the same batch;
tests/test_programs.py checks SVI on it agrees with the closed form.

With `decay_unobserved`, prompts not rolled out also decay toward the prior every step. That is
done lazily: each prompt remembers the step of its last update and is brought up to date with
lam**delta when it is next predicted or observed, so a step never sweeps the whole pool.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pydantic import Field
from pyro.nn import PyroModule, PyroParam
from torch import Tensor

from .base import PredictorOptions, Program, PromptPool, RiskPredictor, Rows
from .posteriors import BetaPosterior
from mpts.inference.forgetting import decay_concentration


class BetaBernoulliOptions(PredictorOptions):
    decay: float = Field(0.9, ge=0.0, le=1.0, description="lam: weight kept on the old posterior per update")
    prior_alpha: float = Field(1.0, gt=0.0)
    prior_beta: float = Field(1.0, gt=0.0)
    decay_unobserved: bool = Field(False, description="also decay prompts that were not rolled out")
    mopps_exact: bool = Field(
        False, description="predict the undecayed posterior, as MoPPS does (for reproducing it). By default "
                           "a prediction is the decayed prior the prompt's next update starts from, so what is "
                           "predicted is what the model then conditions on; MoPPS predicts Beta(a + s, b + k - s) "
                           "but updates from lam times it, which is overconfident")


@dataclasses.dataclass(frozen=True)
class BetaState:
    alpha: Tensor  # float32 [N]
    beta: Tensor  # float32 [N]
    last_step: Tensor | None  # int32 [N]: step of each prompt's last update, kept only when unobserved prompts decay


def model(prior_alpha: Tensor, prior_beta: Tensor, successes: Tensor, trials: Tensor) -> None:
    with pyro.plate("prompts", prior_alpha.shape[0]):
        p = pyro.sample("p", dist.Beta(prior_alpha, prior_beta))
        pyro.sample("s", dist.Binomial(trials, p), obs=successes)


class Guide(PyroModule):
    """q(p_i) = Beta(q_alpha_i, q_beta_i), started at the prior."""

    def __init__(self, prior_alpha: Tensor, prior_beta: Tensor):
        super().__init__()
        self.q_alpha = PyroParam(prior_alpha.detach().clone(), constraint=dist.constraints.positive)
        self.q_beta = PyroParam(prior_beta.detach().clone(), constraint=dist.constraints.positive)

    def forward(self, prior_alpha: Tensor, prior_beta: Tensor, successes: Tensor, trials: Tensor) -> None:
        with pyro.plate("prompts", prior_alpha.shape[0]):
            pyro.sample("p", dist.Beta(self.q_alpha, self.q_beta))


def conjugate_update(prior_alpha: Tensor, prior_beta: Tensor, successes: Tensor, trials: Tensor) -> tuple[Tensor, Tensor]:
    """The exact posterior of `model`: Pyro's `Beta.conjugate_update` with the Binomial
    likelihood written as the Beta density p^s (1 - p)^(k - s). Float64 inside, so the result is
    the correctly rounded alpha + s, beta + k - s in the state's dtype."""
    prior = dist.Beta(prior_alpha.double(), prior_beta.double())
    likelihood = dist.Beta(successes.double() + 1.0, (trials - successes).double() + 1.0)
    posterior, _ = prior.conjugate_update(likelihood)
    return posterior.concentration1.to(prior_alpha.dtype), posterior.concentration0.to(prior_beta.dtype)


class BetaBernoulli(RiskPredictor):
    name = "beta"
    Options = BetaBernoulliOptions

    def __init__(self, pool: PromptPool, options: BetaBernoulliOptions | None = None, seed: int = 0):
        super().__init__(pool, options, seed)
        o = self.options
        self.state = BetaState(alpha=torch.full((self.num_prompts,), o.prior_alpha, dtype=torch.float32),
                               beta=torch.full((self.num_prompts,), o.prior_beta, dtype=torch.float32),
                               last_step=torch.zeros(self.num_prompts, dtype=torch.int32) if o.decay_unobserved else None)

    def _current(self, ids: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """(alpha, beta) of these prompts as of `step`, lazy decay of waiting steps applied."""
        state, o = self.state, self.options
        alpha, beta = state.alpha[ids], state.beta[ids]
        if state.last_step is not None:
            waited = (step - state.last_step[ids]).clamp_min(0)
            alpha = decay_concentration(alpha, o.prior_alpha, o.decay, waited)
            beta = decay_concentration(beta, o.prior_beta, o.decay, waited)
        return alpha, beta

    def _predict(self, ids: Tensor, step: int) -> BetaPosterior:
        if self.options.mopps_exact:
            return BetaPosterior(*self._current(ids, step))
        return BetaPosterior(*self.decayed_prior(ids, step))

    def decayed_prior(self, ids: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """The prior for this step's update: the posterior, tempered toward the base prior."""
        o = self.options
        alpha, beta = self._current(ids, step)
        if self.state.last_step is None:  # MoPPS: only rolled-out prompts decay, once per update
            alpha = decay_concentration(alpha, o.prior_alpha, o.decay)
            beta = decay_concentration(beta, o.prior_beta, o.decay)
        # With lazy decay the waited steps (including this one's) are already applied.
        return alpha, beta

    def _observe(self, ids: Tensor, successes: Tensor, trials: Tensor, step: int):
        alpha, beta = conjugate_update(*self.decayed_prior(ids, step), successes, trials)
        changes = {"alpha": Rows(ids, alpha), "beta": Rows(ids, beta)}
        if self.state.last_step is not None:  # the decay due at this step is in the prior above
            changes["last_step"] = Rows(ids, torch.full_like(ids, step, dtype=torch.int32))
        return changes, {}

    def program(self, ids: Tensor, successes: Tensor, trials: Tensor, step: int) -> Program:
        prior_alpha, prior_beta = self.decayed_prior(self.check_ids(ids), int(step))
        o = self.options

        def next_prediction(guide: Guide) -> BetaPosterior:
            """The prediction at step + 1: the fitted posterior, decayed once as the next update's prior."""
            alpha, beta = guide.q_alpha.detach(), guide.q_beta.detach()
            if o.mopps_exact:
                return BetaPosterior(alpha, beta)
            return BetaPosterior(decay_concentration(alpha, o.prior_alpha, o.decay),
                                 decay_concentration(beta, o.prior_beta, o.decay))

        return Program(model, Guide(prior_alpha, prior_beta), (prior_alpha, prior_beta, successes, trials),
                       "conjugate", next_prediction)
