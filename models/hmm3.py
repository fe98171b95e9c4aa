"""Three-state HMM risk predictor (DPS), as a Pyro program with a closed-form filter.

Each prompt's state at a step is read off its k rollouts: 0 unsolved (s = 0), 1 partially solved
(0 < s < k), 2 solved (s = k). States follow a Markov chain whose transition matrix has Dirichlet
rows. Generative model of one window of a prompt's history (`model` below)::

    P[i, :] ~ Dirichlet(alpha[i, :])                  i = 0, 1, 2
    x_{t0} ~ belief at the start of the window
    x_t | x_{t-1} ~ Categorical(P[x_{t-1}, :])
    y_t = x_t when the prompt is rolled out at step t, else "waited" (no information about x_t)

How y_t is read off the k rollouts is the option `state_reading`: "bucket" (DPS, `hmm3`'s default)
takes the bucket of s for the state; "posterior" (`hmm3_pooled`'s default) keeps the state latent
and weighs it by the likelihood L_j = P(s | x_t = j) of the predictive's own story (s = 0 if
unsolved, Beta-Binomial(k, a, b) if partial, s = k if solved), so a partial prompt that lands on
0 or k stays partly partial. Bucket reading is L = one-hot(bucket) in every formula below.

The fast path is the DPS filter, per prompt and step t (rows are "from", columns "to")::

    predict   w_t = b_{t-1} @ E[P | alpha_{t-1}]              (E[P] = alpha with rows normalised)
    rolled out, outcome likelihood L:
              xi[i, j] = b_{t-1}[i] E[P][i, j] L[j] / sum(w_t L)    (soft count of the transition i -> j)
              alpha_t = lam * alpha_{t-1} + (1 - lam) * prior + xi,   b_t[j] = sum_i xi[i, j]
    waited:   alpha_t = lam * alpha_{t-1} + (1 - lam) * prior,        b_t = w_t

Waiting steps are never swept. A prompt stores its excess counts E = alpha - prior, its state
belief after its last update and the step of that update; when it is next looked at after m
steps, alpha = prior + lam**(m) E in closed form and the belief is the product of the m waited
steps' matrices, computed by `propagate` (an exact batched recurrence while lam**d E still
matters, then a batched matrix power). The belief after an update, b ∝ w_t L, is one-hot for
0 < s < k, and with s = 0 (or k) only unsolved (solved) and partial are possible, so one float
holds it: r = b1 + 2 b2, the expected state index, and b_j = max(0, 1 - abs(r - j)) (r = -1: never
rolled out).

Pooling (`pooling="cluster"|"global"`), which none of the references has: the prior of each
prompt's rows is no longer the fixed alpha0 but `pool_strength` times the shared transition
matrix of its cluster (or of the whole pool), estimated from the soft counts of every prompt in
it (decayed at `decay` rate "pool"). A prompt rolled out once already predicts with its cluster's
dynamics; its own counts then pull it away from them. Waiting steps use the shared matrix as it
stands now (the best current estimate of the cluster's dynamics).

The predictive `ThreeStateMixturePosterior` turns the state belief w into one distribution of the
success rate: p = 0 (unsolved) with probability w0, p ~ Beta(a, b) (partial) with w1, p = 1
(solved) with w2, and S ~ Binomial(n, p). The Beta is fitted online to s/n of the partially
solved groups only (moment matching with the binomial-noise correction). `log_prob`, `pit`,
`p_informative`, `mean`, `variance`, `interval` and `sample` are all of this one mixture. With
the bucket reading the filter's w predicts the bucket, not the state of this mixture (w1 falls
short of the partial state's frequency by its Beta-Binomial mass at 0 and k): on the pooled
generative model of tests/test_predictive_conformance.py that made `hmm3_pooled`'s 50% / 90%
regions for p cover 0.550 / 0.913 (ranks humped, chi-square p 1.4e-4); the posterior reading
gives 0.516 / 0.900 (p 0.68).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Literal

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam
from pyro.ops.indexing import Vindex
from pydantic import Field, field_validator
from scipy import special
from torch import Tensor

from mpts.inference.forgetting import decay_option, decay_rates, factor

from .base import PredictorOptions, Program, PromptPool, RiskPredictor, Rows, SuccessPosterior
from .distributions import ThreeStateCount, log_beta

NUM_STATES = 3
UNSEEN = -1.0  # stored state of a prompt never rolled out
STATE_INDEX = torch.arange(NUM_STATES, dtype=torch.float32)
WAITED = 3  # observation symbol of a step the prompt was not rolled out


# -- the Pyro program ----------------------------------------------------------------------------
def emission(observe_prob: float = 0.5) -> dist.Categorical:
    """y = the state with probability `observe_prob`, else WAITED, whatever the state.

    Whether a prompt is rolled out does not depend on its unobserved state (only on what was
    already observed), so waiting steps carry no information and the filter may ignore them.
    """
    probs = torch.zeros(NUM_STATES, NUM_STATES + 1)
    probs[range(NUM_STATES), range(NUM_STATES)] = observe_prob
    probs[:, WAITED] = 1.0 - observe_prob
    return dist.Categorical(probs=probs)


def state_chain(initial_belief: Tensor, transition: Tensor, num_steps: int,
                observe_prob: float = 0.5) -> dist.DiscreteHMM:
    """The chain of states over a window as a `DiscreteHMM`.

    initial_belief [..., 3]: the state just before the window; transition [..., T, 3, 3] (T = 1:
    the same matrix every step); observations are [..., T] codes 0/1/2 or WAITED.
    """
    return dist.DiscreteHMM(initial_belief.log(), transition.log(), emission(observe_prob), duration=num_steps)


def model(initial_belief: Tensor, concentration: Tensor, observations: Tensor, observe_prob: float = 0.5) -> None:
    """Dirichlet rows, a Markov chain of categorical states, observations (WAITED = not rolled out)."""
    with pyro.plate("prompts", initial_belief.shape[0]):
        transition = pyro.sample("transition", dist.Dirichlet(concentration).to_event(1))
        pyro.sample("states", state_chain(initial_belief, transition.unsqueeze(-3), observations.shape[-1],
                                          observe_prob),
                    obs=observations)


class Guide(PyroModule):
    """q(P_i) = Dirichlet rows with concentration q_concentration [n, 3, 3], started at `concentration`."""

    def __init__(self, concentration: Tensor):
        super().__init__()
        self.q_concentration = PyroParam(concentration.detach().clone(), constraint=dist.constraints.positive)

    def forward(self, *args, **kwargs) -> None:
        with pyro.plate("prompts", self.q_concentration.shape[0]):
            pyro.sample("transition", dist.Dirichlet(self.q_concentration).to_event(1))


def waited_belief(start: Tensor, matrices: Tensor, waits: Tensor) -> Tensor:
    """The state after `waits[i]` unobserved steps from `start[i]`, by Pyro's `DiscreteHMM` filter.

    matrices [n, T, 3, 3] are the steps' transition matrices (prompt i uses its first waits[i]);
    shorter windows are padded in front with identity steps. The reference for `propagate`.
    """
    n, longest = matrices.shape[0], matrices.shape[1]
    if longest == 0:
        return start
    offset = torch.arange(longest).unsqueeze(0) - (longest - waits).unsqueeze(1)  # index into each prompt's matrices
    used = offset >= 0
    picked = matrices.gather(1, offset.clamp_min(0).view(n, longest, 1, 1).expand(n, longest, NUM_STATES, NUM_STATES))
    steps = torch.where(used.view(n, longest, 1, 1), picked, torch.eye(NUM_STATES).expand(n, longest, NUM_STATES, NUM_STATES))
    chain = state_chain(start.clamp_min(1e-30), steps.clamp_min(1e-30), longest)
    return chain.filter(torch.full((n, longest), float(WAITED))).probs


def transition_model(previous_belief: Tensor, concentration: Tensor, states: Tensor,
                     likelihood: Tensor | None = None) -> None:
    """One update of the filter: an uncertain previous state, then the state at this step.

    With `previous_state` enumerated, its posterior marginal is the soft count xi[:, j] the
    closed-form update adds; with a known previous state the update is the exact posterior.
    `likelihood` None: the state is observed (`states`, the bucket reading); else [n, 3] the
    outcome's likelihood P(s | state) and the state is enumerated too (the posterior reading).
    """
    with pyro.plate("prompts", previous_belief.shape[0]):
        transition = pyro.sample("transition", dist.Dirichlet(concentration).to_event(1))
        previous = pyro.sample("previous_state", dist.Categorical(previous_belief),
                               infer={"enumerate": "parallel"})
        row = Vindex(transition)[..., previous, :]
        if likelihood is None:
            pyro.sample("state", dist.Categorical(row), obs=states)
            return
        state = pyro.sample("state", dist.Categorical(row), infer={"enumerate": "parallel"})
        pyro.factor("outcome", Vindex(likelihood.clamp_min(1e-30).log())[..., state])


# -- the closed-form filter ------------------------------------------------------------------------
def row_normalise(concentration: Tensor) -> Tensor:
    """E[P] under Dirichlet rows."""
    return concentration / concentration.sum(-1, keepdim=True)


def decay_factor(lam: float, steps: Tensor) -> Tensor:
    """lam**steps as [n, 1, 1] float32 (`inference.forgetting.factor`)."""
    return factor(lam, steps, torch.float32).view(-1, 1, 1)


def exact_steps(lam: float, tol: float, excess_mass: float, prior_mass: float) -> int:
    """How many waited steps the decaying counts still move E[P] by more than `tol` (L1 per row).

    Row i of E[P] after d steps is a convex mix of the prior's row and the excess's row with
    weight lam**d e_i / (r_i + lam**d e_i) <= lam**d e_i / r_i on the excess, so beyond that many
    steps every matrix equals the limiting one to within `tol`.
    """
    if excess_mass <= 0.0 or lam >= 1.0:
        return 0
    if lam <= 0.0:
        return 1
    return max(1, math.ceil(math.log(tol * prior_mass / (2.0 * excess_mass)) / math.log(lam)))


def propagate(belief: Tensor, prior: Tensor, excess: Tensor, lam: float, steps: Tensor, tol: float = 1e-7) -> Tensor:
    """belief @ M_0 @ M_1 ... @ M_{steps-1} with M_d = E[P | prior + lam**d * excess], batched.

    belief [n, 3]; prior [n, 3, 3] or [3, 3]; excess [n, 3, 3]; steps [n] (>= 0). The first
    `exact_steps` matrices are applied one by one (a loop over at most that many steps, batched
    over prompts); the rest differ from M_D by less than `tol`, so they are one matrix power,
    taken by repeated squaring. Only prompts with steps > 0 are touched.
    """
    moving = torch.nonzero(steps > 0).squeeze(1)
    if moving.numel() == 0:
        return belief
    if moving.numel() == steps.numel():
        return _propagate_moving(belief, prior, excess, lam, steps, tol)
    out = belief.clone()
    out[moving] = _propagate_moving(belief[moving], prior if prior.dim() == 2 else prior[moving],
                                    excess[moving], lam, steps[moving], tol)
    return out


def _propagate_moving(belief: Tensor, prior: Tensor, excess: Tensor, lam: float, steps: Tensor, tol: float) -> Tensor:
    # NumPy in a prompt-last layout (b [3, n], matrices [3, 3, n]): each op runs over contiguous
    # rows of n values with a fraction of torch's per-call overhead, and prompts sorted by steps
    # (most first) let step d work on a prefix: the prompts still waiting at d.
    order = torch.argsort(steps, descending=True)
    waits = steps.index_select(0, order).numpy()
    b = np.ascontiguousarray(belief.index_select(0, order).numpy().T)
    e = np.ascontiguousarray(excess.index_select(0, order).numpy().transpose(1, 2, 0))
    shared = prior.dim() == 2
    p = prior.numpy() if shared else np.ascontiguousarray(prior.index_select(0, order).numpy().transpose(1, 2, 0))
    e_rows = e.sum(1)
    p_rows = p.sum(1)[:, None] if shared else p.sum(1)
    exact = min(int(waits[0]), exact_steps(lam, tol, float(e_rows.max()), float(p_rows.min())))
    still = np.searchsorted(-waits, -np.arange(exact), side="left")  # prompts with steps > d
    for d in range(exact):
        k, c = int(still[d]), lam ** d
        w = b[:, :k] / (p_rows[:, :k] + c * e_rows[:, :k])
        moved = p.T @ w if shared else np.einsum("in,ijn->jn", w, p[:, :, :k])
        moved += c * np.einsum("in,ijn->jn", w, e[:, :, :k])
        b[:, :k] = moved
    rest = waits - exact
    k = int((rest > 0).sum())
    if k:
        tail = (p[:, :, None] if shared else p[:, :, :k]) + lam ** exact * e[:, :, :k]
        b[:, :k] = _apply_power(b[:, :k], tail / tail.sum(1, keepdims=True), rest[:k])
    out = torch.empty_like(belief)
    out[order] = torch.from_numpy(np.ascontiguousarray(b.T))
    return out


def _apply_power(b: np.ndarray, matrix: np.ndarray, exponent: np.ndarray) -> np.ndarray:
    """b @ matrix**exponent per prompt (b [3, n], matrix [3, 3, n]) by binary exponentiation;
    powers of one matrix commute, so the order of the factors does not matter."""
    exponent = exponent.copy()
    while True:
        bit = (exponent & 1).astype(bool)
        if bit.any():
            b = np.where(bit, np.einsum("in,ijn->jn", b, matrix), b)
        exponent >>= 1
        if not exponent.any():
            return b
        matrix = np.einsum("ikn,kjn->ijn", matrix, matrix)


def soft_counts(previous_belief: Tensor, transition: Tensor, likelihood: Tensor) -> tuple[Tensor, Tensor]:
    """(xi [n, 3, 3], predictive w [n, 3]): the posterior over the transition (previous, current),
    given the outcome's likelihood [n, 3] per current state (one-hot: an observed state)."""
    predictive = (previous_belief.unsqueeze(-1) * transition).sum(-2)
    joint = previous_belief.unsqueeze(-1) * transition * likelihood.unsqueeze(-2)
    xi = joint / joint.sum((-2, -1), keepdim=True)
    return xi, predictive


def outcome_likelihood(successes: Tensor, trials: Tensor, a: float, b: float, reading: str) -> Tensor:
    """L [n, 3] proportional to P(outcome | state): one-hot of the bucket ("bucket"), or the
    predictive's own emission ("posterior"): s = 0 if unsolved, Beta-Binomial(trials, a, b) if
    partial, s = trials if solved. Each row is scaled to max 1 (the posterior does not change): a
    group with 0 < s < k is [0, 1, 0], s = 0 gives [1, BB(0), 0], s = k gives [0, BB(k), 1]."""
    s, k = successes.numpy(), trials.numpy()
    zero, full = s == 0, s == k
    likelihood = np.zeros((s.shape[0], NUM_STATES), dtype=np.float32)  # NumPy: a few µs for a batch
    likelihood[:, 0], likelihood[:, 2] = zero, full
    if reading == "bucket":
        likelihood[:, 1] = ~(zero | full)
    else:
        if k.size and k.min() == k.max():  # one k for the batch (the usual case): scalars
            k = float(k[0])
            gammaln, total = math.lgamma, math.lgamma(a + b + k)
        else:
            k = k.astype(np.float64)
            gammaln, total = special.gammaln, special.gammaln(a + b + k)
        at_zero = np.exp(gammaln(b + k) - total + (math.lgamma(a + b) - math.lgamma(b)))
        at_all = np.exp(gammaln(a + k) - total + (math.lgamma(a + b) - math.lgamma(a)))
        likelihood[:, 1] = np.where(zero, at_zero, np.where(full, at_all, 1.0))
    return torch.from_numpy(likelihood)


def stored_state(belief: Tensor, buckets: Tensor) -> Tensor:
    """b1 + 2 b2 of a belief after an update (zero on the state(s) its bucket rules out), exact at
    0, 1, 2 where the belief is one-hot: b1 for s = 0, 1 for 0 < s < k, 2 - b1 for s = k."""
    partial = belief[:, 1]
    return torch.where(buckets == 1, 1.0, torch.where(buckets == 2, 2.0 - partial, partial))


def states_of(successes: Tensor, trials: Tensor) -> Tensor:
    """0 unsolved (s = 0), 1 partially solved, 2 solved (s = k)."""
    return (successes > 0).long() + (successes == trials).long()


# -- the predictive ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ThreeStateMixturePosterior(SuccessPosterior):
    """Success rate and count from a belief w over the three states.

    The rate p is unsolved (p = 0) with probability w0, partial (p ~ Beta(a, b)) with w1, solved
    (p = 1) with w2, and S ~ Binomial(n, p): `predictive(n)` is that count distribution
    (`ThreeStateCount`). Mean, variance, interval and samples are of this one mixing
    distribution of p, so E[p] = E[S] / n, Binomial(n, sample()) follows `log_prob`, and
    `p_informative(k)` = 1 - P(S = 0) - P(S = k) of the same pmf (w1 times the Beta-Binomial's
    mass on 1..k-1).
    """

    state_probs: Tensor  # [n, 3]: unsolved, partial, solved
    a: float
    b: float

    def _partial_moments(self) -> tuple[float, float]:
        """E[p] and E[p^2] under Beta(a, b)."""
        total = self.a + self.b
        return self.a / total, self.a * (self.a + 1) / (total * (total + 1))

    @property
    def mean(self) -> Tensor:
        first, _ = self._partial_moments()
        return self.state_probs[:, 1] * first + self.state_probs[:, 2]

    @property
    def variance(self) -> Tensor:
        first, second = self._partial_moments()
        mean = self.state_probs[:, 1] * first + self.state_probs[:, 2]
        return (self.state_probs[:, 1] * second + self.state_probs[:, 2] - mean.square()).clamp_min(0.0)

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
        """A state per draw (inverse CDF of w), then p = 0, a Beta(a, b) draw, or 1."""
        w = self.state_probs.double()
        u = torch.rand((num_samples, w.shape[0]), generator=generator, dtype=torch.float64)
        # NumPy's Beta sampler seeded from the torch generator: reproducible and fast
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
        partial = torch.from_numpy(rng.beta(self.a, self.b, size=(num_samples, w.shape[0])))
        draws = torch.where(u < w[:, 0], 0.0, torch.where(u < w[:, 0] + w[:, 1], partial, 1.0))
        return draws.to(self.state_probs.dtype)

    def predictive(self, trials: Tensor) -> ThreeStateCount:
        """The success count of a group of `trials` rollouts, as a Pyro distribution."""
        return ThreeStateCount(self.state_probs.double(), self.a, self.b, trials.double(), validate_args=False)

    def log_prob(self, successes: Tensor, trials: Tensor) -> Tensor:
        """Exact log P(S = successes | trials); broadcasts successes [..., n] against trials [n]."""
        return self.predictive(trials).log_prob(successes).to(self.state_probs.dtype)

    def log_prob_grid(self, successes: Tensor, trials: Tensor) -> Tensor:
        return self.log_prob(successes, trials)

    def p_informative(self, k) -> Tensor:
        """w1 (1 - BetaBinomial(0; k) - BetaBinomial(k; k)): 1 - P(0) - P(k) of `log_prob`, in closed form."""
        k = torch.as_tensor(k, dtype=torch.float64).expand(self.state_probs.shape[0])
        a, b = torch.tensor(self.a, dtype=torch.float64), torch.tensor(self.b, dtype=torch.float64)
        ends = (log_beta(a, b + k) - log_beta(a, b)).exp() + (log_beta(a + k, b) - log_beta(a, b)).exp()
        return (self.state_probs[:, 1].double() * (1.0 - ends)).clamp(0.0, 1.0).to(self.state_probs.dtype)

    def interval(self, level: float) -> tuple[Tensor, Tensor]:
        tail = (1.0 - level) / 2
        return self._quantile(tail), self._quantile(1.0 - tail)

    def _quantile(self, q: float) -> Tensor:
        """Inverse CDF of the mixture: F(x) = w0 + w1 I_x(a, b) below 1, so 0 where q <= w0, 1 where
        q > w0 + w1, and the Beta's quantile at (q - w0) / w1 between."""
        w = self.state_probs.double().numpy()
        inner = np.clip((q - w[:, 0]) / np.maximum(w[:, 1], 1e-300), 0.0, 1.0)
        x = np.where(q <= w[:, 0], 0.0, np.where(q > w[:, 0] + w[:, 1], 1.0, special.betaincinv(self.a, self.b, inner)))
        return torch.from_numpy(x).to(self.state_probs.dtype)


_TRUNCATION_ITERATIONS = 40


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _beta_from_moments(first: float, second: float) -> tuple[float, float]:
    """(a, b) of the Beta with E[p] = first, E[p^2] = second (variance kept inside (0, mean (1 - mean)))."""
    spread = first * (1.0 - first)
    variance = min(max(second - first * first, 1e-4 * spread), 0.98 * spread)
    concentration = spread / variance - 1.0
    return max(first * concentration, 1e-2), max((1.0 - first) * concentration, 1e-2)


# -- the predictor --------------------------------------------------------------------------------
DECAY_PARTS = {"transitions": 0.7, "pool": 0.9, "fits": 0.95}  # lam per step of each forgotten quantity


class ThreeStateHMMOptions(PredictorOptions):
    decay: float | dict[str, float] = decay_option(DECAY_PARTS, "the transition counts, the pooled counts and the "
                                                                "running fits")
    prior_alpha: float | list[list[float]] = Field(
        1.0, description="alpha0: Dirichlet concentration of every transition cell, or a 3x3 matrix (from, to)")
    pooling: Literal["none", "cluster", "global"] = Field(
        "none", description="share transition counts within pool.clusters, across all prompts, or not at all")
    pool_strength: float = Field(3.0, gt=0.0, description="row concentration of the pooled prior of each prompt")
    state_reading: Literal["bucket", "posterior"] = Field(
        "bucket", description="bucket: the state is the bucket of s (DPS); posterior: the state stays latent, "
                              "s = 0 or k may come from the partial state (its Beta-Binomial mass there)")
    initial_belief: tuple[float, float, float] | None = Field(
        None, description="state distribution of a prompt never rolled out; None: fitted online to first rollouts")
    fit_prior_weight: float = Field(4.0, gt=0.0, description="pseudo-observations behind the running fits")
    catchup_tol: float = Field(1e-7, gt=0.0, lt=1.0,
                               description="below this change of E[P] per step, waited steps are one matrix power")

    @field_validator("decay")
    @classmethod
    def _check_decay(cls, value):
        decay_rates(value, DECAY_PARTS)
        return value

    @field_validator("prior_alpha")
    @classmethod
    def _check_prior(cls, value):
        matrix = torch.as_tensor(value, dtype=torch.float64)
        if matrix.dim() != 0 and matrix.shape != (NUM_STATES, NUM_STATES):
            raise ValueError(f"prior_alpha must be a number or a 3x3 matrix, got shape {tuple(matrix.shape)}")
        if not bool(torch.isfinite(matrix).all()) or bool((matrix <= 0).any()):
            raise ValueError("prior_alpha must be finite and > 0 in every cell (Dirichlet concentrations)")
        return value

    @field_validator("initial_belief")
    @classmethod
    def _check_belief(cls, value):
        if value is not None and (min(value) < 0 or abs(sum(value) - 1.0) > 1e-6):
            raise ValueError(f"initial_belief must be 3 probabilities summing to 1, got {value}")
        return value


# Running sums behind the online fits (float64, decayed at `decay` rate "fits" per step): the
# partial state's Beta from partially solved groups only (the other two states are p = 0 and
# p = 1), and the (posterior) states of first rollouts.
_PARTIAL_GROUPS, _RATE_SUM, _PAIR_SUM, _TRIALS_SUM = range(4)
_FIRST_STATES = slice(4, 7)


@dataclasses.dataclass(frozen=True)
class HMMState:
    excess: Tensor  # float32 [N, 3, 3]: alpha - prior as of each prompt's last update
    last_state: Tensor  # float32 [N]: belief after the last update as b1 + 2 b2 (UNSEEN: never rolled out)
    last_step: Tensor  # int32 [N]
    fit_sums: Tensor  # float64 [7]: running sums of the online fits
    fit_step: Tensor  # int64 scalar, -1 before the first update
    pool_excess: Tensor | None  # float32 [pools, 3, 3] (pooling only)
    pool_step: Tensor | None  # int64 scalar (pooling only)


class ThreeStateHMM(RiskPredictor):
    name = "hmm3"
    Options = ThreeStateHMMOptions
    global_pooling_without_clusters = False  # hmm3 with pooling='cluster' asked for clusters explicitly

    def __init__(self, pool: PromptPool, options: ThreeStateHMMOptions | None = None, seed: int = 0):
        super().__init__(pool, options, seed)
        o = self.options
        n = self.num_prompts
        self.rates = decay_rates(o.decay, DECAY_PARTS)
        self.prior = torch.as_tensor(o.prior_alpha, dtype=torch.float32).expand(NUM_STATES, NUM_STATES).clone()
        self.cluster_index, num_pools = self._pools(pool)
        self._fit_memo: tuple[tuple[float, ...], tuple[tuple[float, float], Tensor]] | None = None
        self.state = HMMState(
            excess=torch.zeros(n, NUM_STATES, NUM_STATES, dtype=torch.float32),
            last_state=torch.full((n,), UNSEEN, dtype=torch.float32),
            last_step=torch.zeros(n, dtype=torch.int32),
            fit_sums=torch.zeros(7, dtype=torch.float64), fit_step=torch.tensor(-1, dtype=torch.int64),
            pool_excess=torch.zeros(num_pools, NUM_STATES, NUM_STATES, dtype=torch.float32) if num_pools else None,
            pool_step=torch.tensor(-1, dtype=torch.int64) if num_pools else None)

    def _pools(self, pool: PromptPool) -> tuple[Tensor | None, int]:
        mode = self.options.pooling
        if mode == "none":
            return None, 0
        if mode == "global":
            return None, 1
        clusters = pool.clusters
        if clusters is None:
            if self.global_pooling_without_clusters:
                warnings.warn(f"{self.name}: the prompt pool has no clusters; pooling transition counts "
                              "across all prompts instead (pooling='global')", stacklevel=3)
                return None, 1
            raise ValueError("pooling='cluster' needs pool.clusters (an integer group per prompt); "
                             "use pooling='global' or 'none' for a pool without clusters")
        if clusters.is_floating_point() or clusters.dtype == torch.bool:
            raise TypeError(f"pool.clusters must be integers, got dtype {clusters.dtype}")
        if int(clusters.min()) >= 0 and int(clusters.max()) < clusters.shape[0]:
            return clusters, int(clusters.max()) + 1
        labels, index = torch.unique(clusters, return_inverse=True)
        return index.to(torch.int32), labels.shape[0]

    # -- reading the state as of a step ---------------------------------------------------------
    def prior_for(self, ids: Tensor, step: int) -> Tensor:
        """Dirichlet prior of each prompt's rows as of step - 1: alpha0, or the pooled matrix."""
        state = self.state
        if state.pool_excess is None:
            return self.prior
        o = self.options
        waited = step - 1 - int(state.pool_step)
        fade = float(factor(self.rates["pool"], waited)) if int(state.pool_step) >= 0 and waited > 0 else 1.0
        if self.cluster_index is None:  # one shared matrix: keep it [3, 3]
            return o.pool_strength * row_normalise(self.prior + fade * state.pool_excess[0])
        shared = state.pool_excess.index_select(0, self.cluster_index.index_select(0, ids).long())
        return o.pool_strength * row_normalise(torch.add(self.prior, shared, alpha=fade))

    def initial_belief(self) -> Tensor:
        return self._fitted()[1]

    def _fitted(self) -> tuple[tuple[float, float], Tensor]:
        """(rate_beta, initial_belief) of the running fits, memoised per fit state (both are read
        by every predict and observe; the Beta's fixed point is the costly part)."""
        sums = tuple(self.state.fit_sums.tolist())
        if self._fit_memo is None or self._fit_memo[0] != sums:
            self._fit_memo = (sums, (self._fit_rate_beta(sums), self._fit_initial_belief(sums)))
        return self._fit_memo[1]

    def _fit_initial_belief(self, sums: tuple[float, ...]) -> Tensor:
        o = self.options
        if o.initial_belief is not None:
            return torch.tensor(o.initial_belief, dtype=torch.float32)
        first = torch.tensor(sums[_FIRST_STATES], dtype=torch.float64)
        return ((o.fit_prior_weight / NUM_STATES + first) / (o.fit_prior_weight + first.sum())).float()

    def rate_beta(self) -> tuple[float, float]:
        """(a, b): the partial state's Beta of success rates, fitted to the partially solved groups.

        Those groups are Beta-Binomial counts with their ends (0 and n) cut off, so matching the
        Beta to their s/n directly would make it too narrow. Moments are matched to the
        truncated Beta-Binomial instead: with P0, Pn its end masses, the untruncated moments are
        (1 - P0 - Pn) m_truncated + Pn, iterated to a fixed point (E[S(S-1)] / (n(n-1)) = E[p^2]
        corrects for binomial noise; n is the partial groups' mean trial count)."""
        return self._fitted()[0]

    def _fit_rate_beta(self, sums: tuple[float, ...]) -> tuple[float, float]:
        w0 = self.options.fit_prior_weight
        first = (0.5 * w0 + sums[_RATE_SUM]) / (w0 + sums[_PARTIAL_GROUPS])  # prior: Beta(1, 1)
        second = (w0 / 3.0 + sums[_PAIR_SUM]) / (w0 + sums[_PARTIAL_GROUPS])
        a, b = _beta_from_moments(first, second)
        if sums[_PARTIAL_GROUPS] <= 0.0:
            return a, b
        n = sums[_TRIALS_SUM] / sums[_PARTIAL_GROUPS]
        for _ in range(_TRUNCATION_ITERATIONS):
            base = _log_beta(a, b)
            p0, pn = math.exp(_log_beta(a, b + n) - base), math.exp(_log_beta(a + n, b) - base)
            a, b = _beta_from_moments((1.0 - p0 - pn) * first + pn, (1.0 - p0 - pn) * second + pn)
        return a, b

    def _history(self, ids: Tensor, step: int):
        """Per prompt: belief after its last update, row prior, excess counts, steps since, unseen."""
        state = self.state
        stored = state.last_state.index_select(0, ids)
        unseen = stored < 0  # b_j = max(0, 1 - |r - j|), zero where unseen; there the initial belief
        start = stored.unsqueeze(-1) - STATE_INDEX
        start.abs_().neg_().add_(1.0).clamp_min_(0.0).addcmul_(unseen.unsqueeze(-1).float(), self.initial_belief())
        since = (step - state.last_step.index_select(0, ids).long()).masked_fill_(unseen, 0)
        return start, self.prior_for(ids, step), state.excess.index_select(0, ids), since, unseen

    def _previous(self, ids: Tensor, step: int):
        """Each prompt as of step - 1: belief b_{t-1} (lazy catch-up by `propagate`), concentration
        alpha_{t-1}, plus its history."""
        start, prior, excess, since, unseen = self._history(ids, step)
        lam = self.rates["transitions"]
        previous = propagate(start, prior, excess, lam, (since - 1).clamp_min(0), self.options.catchup_tol)
        concentration = prior + decay_factor(lam, (since - 1).clamp_min(0)) * excess
        return previous, concentration, start, since, unseen, excess

    def state_belief(self, ids: Tensor, step: int) -> Tensor:
        """w_t [n, 3]: the predicted state at `step`, before its outcome. Prompts never rolled out
        get the initial belief; a prompt updated at this very step gets its belief after that update."""
        ids = self.check_ids(ids)
        previous, concentration, start, since, _, _ = self._previous(ids, int(step))
        moved = (previous.unsqueeze(-1) * row_normalise(concentration)).sum(-2)
        return torch.where((since >= 1).unsqueeze(-1), moved, start)

    def transition_concentration(self, ids: Tensor, step: int) -> Tensor:
        """alpha [n, 3, 3] at the end of `step` if the prompts are not rolled out then."""
        ids = self.check_ids(ids)
        _, prior, excess, since, _ = self._history(ids, int(step) + 1)
        return prior + decay_factor(self.rates["transitions"], (since - 1).clamp_min(0)) * excess

    # -- the predictor calls ----------------------------------------------------------------------
    def _predict(self, ids: Tensor, step: int) -> ThreeStateMixturePosterior:
        return ThreeStateMixturePosterior(self.state_belief(ids, step), *self.rate_beta())

    def _observe(self, ids: Tensor, successes: Tensor, trials: Tensor, step: int):
        o, state = self.options, self.state
        if not -2**31 < step < 2**31 - 1:
            raise ValueError(f"step {step} is outside the int32 range the predictor stores")
        previous, concentration, _, since, unseen, excess = self._previous(ids, step)
        stale = ~unseen & (since <= 0)
        if bool(stale.any()):
            i = int(torch.nonzero(stale)[0])
            raise ValueError(f"step {step} is not after the last update of prompt id {int(ids[i])} "
                             f"(step {step - int(since[i])}); steps must increase")
        likelihood = outcome_likelihood(successes, trials, *self.rate_beta(), o.state_reading)
        xi, predictive = soft_counts(previous, row_normalise(concentration), likelihood)
        belief, buckets = xi.sum(-2), states_of(successes, trials)
        # alpha_t = lam alpha_{t-1} + (1 - lam) prior + xi  <=>  E_t = lam**since E + xi
        changes = {"excess": Rows(ids, decay_factor(self.rates["transitions"], since) * excess + xi),
                   "last_state": Rows(ids, stored_state(belief, buckets)),
                   "last_step": Rows(ids, torch.full_like(ids, step, dtype=torch.int32))}
        if state.pool_excess is not None:
            changes["pool_excess"], changes["pool_step"] = self._pooled(ids, xi, step)
        changes["fit_sums"], changes["fit_step"] = self._fits(successes.double(), trials.double(), buckets, belief, unseen, step)
        # log sum_j w_j L_j (bucket reading: the predicted probability of the observed state)
        chosen = (predictive * likelihood).sum(-1)
        return changes, {"state_log_prob": float(chosen.clamp_min(1e-30).log().mean())}

    def _pooled(self, ids: Tensor, xi: Tensor, step: int) -> tuple[Tensor, Tensor]:
        state = self.state
        fade = factor(self.rates["pool"], max(step - int(state.pool_step), 0)) if int(state.pool_step) >= 0 else 1.0
        pooled = state.pool_excess * fade
        if self.cluster_index is None:
            pooled[0] += xi.sum(0)
        else:
            pooled.index_add_(0, self.cluster_index.index_select(0, ids).long(), xi)
        return pooled, torch.tensor(step, dtype=torch.int64)

    def _fits(self, successes: Tensor, trials: Tensor, buckets: Tensor, belief: Tensor, unseen: Tensor,
              step: int) -> tuple[Tensor, Tensor]:
        state = self.state
        fade = factor(self.rates["fits"], max(step - int(state.fit_step), 0)) if int(state.fit_step) >= 0 else 1.0
        sums = state.fit_sums * fade
        partial = buckets == 1  # 0 < s < n, so n >= 2
        rate = successes[partial] / trials[partial]
        pair_rate = successes[partial] * (successes[partial] - 1) / (trials[partial] * (trials[partial] - 1))
        batch = torch.stack([partial.sum().double(), rate.sum(), pair_rate.sum(), trials[partial].sum()])
        sums[:_FIRST_STATES.start] += batch
        sums[_FIRST_STATES] += (unseen.to(belief.dtype) @ belief).double()  # first rollouts' states
        return sums, torch.tensor(step, dtype=torch.int64)

    # -- the declared program -----------------------------------------------------------------------
    def program(self, ids: Tensor, successes: Tensor, trials: Tensor, step: int) -> Program:
        """One filter step as `transition_model`, the prompt's previous state enumerated (and its
        current one, with the posterior reading: the outcome's likelihood under the Beta as it
        stands before the update).

        The belief before the update comes from Pyro's `DiscreteHMM` filter over the waited steps
        (`waited_belief`), not from the production catch-up kernel, and the Dirichlet prior is the
        decayed one the update adds its soft counts to.
        """
        ids, step, lam = self.check_ids(ids), int(step), self.rates["transitions"]
        start, prior, excess, since, _ = self._history(ids, step)
        waits = (since - 1).clamp_min(0)
        longest = int(waits.max()) if waits.numel() else 0
        decays = decay_factor(lam, torch.arange(longest)).view(1, longest, 1, 1)
        prior_rows = prior if prior.dim() == 3 else prior.expand(ids.shape[0], NUM_STATES, NUM_STATES)
        matrices = row_normalise(prior_rows.unsqueeze(1) + decays * excess.unsqueeze(1))  # [n, T, 3, 3]
        previous = waited_belief(start, matrices, waits)
        concentration = prior_rows + decay_factor(lam, since) * excess
        states = states_of(successes, trials)
        reading = self.options.state_reading
        likelihood = outcome_likelihood(successes, trials, *self.rate_beta(), reading)
        # the state's posterior marginal: the Dirichlet integrates out exactly under the prior rows
        current = previous.unsqueeze(-1) * row_normalise(concentration) * likelihood.unsqueeze(-2)
        current = current.sum(-2) / current.sum((-2, -1)).unsqueeze(-1)

        def posterior(guide: Guide) -> ThreeStateMixturePosterior:
            """Next step's predictive: the current state's belief moved by the posterior mean matrix
            (on the pooled prior as it stands then)."""
            own = guide.q_concentration.detach() - prior_rows
            rows = row_normalise(self.prior_for(ids, step + 1) + own)
            belief = (current.unsqueeze(-1) * rows).sum(-2)
            return ThreeStateMixturePosterior(belief, *self.rate_beta())

        args = (previous, concentration, states, None if reading == "bucket" else likelihood)
        return Program(transition_model, Guide(concentration), args, "filter", posterior)


class PooledThreeStateHMMOptions(ThreeStateHMMOptions):
    pooling: Literal["none", "cluster", "global"] = Field(
        "cluster", description="share transition counts within pool.clusters (the pooled variant's default)")
    state_reading: Literal["bucket", "posterior"] = Field(
        "posterior", description="the state stays latent (the pooled variant's default; calibrated on its own "
                                 "generative model); bucket: the state is the bucket of s, as DPS reads it")


class PooledThreeStateHMM(ThreeStateHMM):
    """The pooled variant under its own name, so ablations and reports tell it apart from DPS."""

    name = "hmm3_pooled"
    Options = PooledThreeStateHMMOptions
    # replayed logs and some environments have no clusters: pool globally (warned) rather than fail
    global_pooling_without_clusters = True
