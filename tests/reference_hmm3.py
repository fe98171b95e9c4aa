"""Independent inference for `hmm3` / `hmm3_pooled`: the DPS filter swept eagerly, step by step.

Float64 NumPy, written from the model's description, not from the predictor's code: every prompt
carries its Dirichlet rows and its state belief through every step. A step first predicts
w = b @ E[P]; a rolled-out prompt's previous and current states are then enumerated (P(prev = i,
state = j | s) is b_i E[P_ij] L_j normalised, L_j = P(s | state j): one-hot of the bucket for the
DPS reading, s = 0 / scipy's Beta-Binomial / s = k for the posterior reading; the Dirichlet
integrates out exactly), its soft counts added and its belief set to the current state's; every
prompt's own counts forget once per step (lam), and each waited step's counts are kept. The
pooled prior of a cluster is the pool's decayed counts row-normalised, as of the step before;
as the predictor documents, a waiting prompt's belief is moved through its waited steps with the
pooled prior as it stands now (so the belief is re-propagated from the last observed state, one
step at a time, whenever it is read; without pooling that is the plain eager recursion).
The rate fits are the partially solved groups' decayed moments; the partial state's Beta must
reproduce them as a Beta-Binomial cut to 0 < S < k (scipy's, not the predictor's fixed point).
"""

import numpy as np
import torch
from scipy import stats

from mpts.models import PromptPool
from mpts.models.registry import PREDICTORS

STATES = 3


def row_normalise(alpha: np.ndarray) -> np.ndarray:
    return alpha / alpha.sum(-1, keepdims=True)


class EagerFilter:
    def __init__(self, predictor):
        o = predictor.options
        self.o, self.n = o, predictor.num_prompts
        rates = {"transitions": 0.7, "pool": 0.9, "fits": 0.95}
        rates.update({part: float(o.decay) for part in rates} if isinstance(o.decay, (int, float)) else o.decay)
        self.lam = rates
        self.alpha0 = np.broadcast_to(np.asarray(o.prior_alpha, dtype=np.float64), (STATES, STATES)).copy()
        if o.pooling == "cluster":
            self.cluster = predictor.pool.clusters.numpy().astype(int)
        else:
            self.cluster = np.zeros(self.n, dtype=int)
        pools = int(self.cluster.max()) + 1
        self.pooled = o.pooling != "none"
        self.pool_counts = np.zeros((pools, STATES, STATES))
        self.own = np.zeros((self.n, STATES, STATES))  # alpha - prior, forgetting applied every step
        self.belief = np.zeros((self.n, STATES))  # state belief after the last rollout
        self.waited = np.zeros((self.n, 0, STATES, STATES))  # own counts at each step waited since the last rollout
        self.waits = np.zeros(self.n, dtype=int)
        self.seen = np.zeros(self.n, dtype=bool)
        self.partial = np.zeros(4)  # decayed: groups, sum s/k, sum s(s-1)/(k(k-1)), sum k
        self.first = np.zeros(STATES)  # decayed (soft) counts of first-rollout states
        self.fit_step = None
        self.step = 0  # every quantity below is as of the end of step `self.step - 1`

    # -- the prior and the predictive -----------------------------------------------------------
    def prior(self) -> np.ndarray:
        """[n, 3, 3]: each prompt's Dirichlet prior rows as they stand now."""
        if not self.pooled:
            return np.broadcast_to(self.alpha0, (self.n, STATES, STATES))
        return self.o.pool_strength * row_normalise(self.alpha0 + self.pool_counts[self.cluster])

    def initial_belief(self) -> np.ndarray:
        if self.o.initial_belief is not None:
            return np.asarray(self.o.initial_belief, dtype=np.float64)
        w0 = self.o.fit_prior_weight
        return (w0 / STATES + self.first) / (w0 + self.first.sum())

    def previous_belief(self) -> np.ndarray:
        """b [n, 3] as of the end of the last step: last observed state moved through each waited step."""
        prior = self.prior()
        belief = self.belief.copy()
        for d in range(int(self.waits.max())):  # step d after the last rollout, for the prompts that waited it
            moving = self.waits > d
            belief[moving] = np.einsum("ni,nij->nj", belief[moving], row_normalise(prior[moving] + self.waited[moving, d]))
        return np.where(self.seen[:, None], belief, self.initial_belief())

    def predictive_belief(self) -> np.ndarray:
        """w [n, 3] of the current step, before its outcomes."""
        moved = np.einsum("ni,nij->nj", self.previous_belief(), row_normalise(self.prior() + self.own))
        return np.where(self.seen[:, None], moved, self.initial_belief())

    def fitted_moments(self) -> tuple[float, float]:
        """Fitted E[s/k] and E[s(s-1)/(k(k-1))] of partially solved groups (Beta(1, 1) pseudo-groups)."""
        w0 = self.o.fit_prior_weight
        groups, rate, pair, _ = self.partial
        return (0.5 * w0 + rate) / (w0 + groups), (w0 / 3 + pair) / (w0 + groups)

    def cut_moments(self, a: float, b: float) -> tuple[float, float]:
        """The same two moments of BetaBinomial(k, a, b) cut to 0 < S < k."""
        groups, _, _, trials = self.partial
        if groups <= 0:  # no partial group yet: the Beta's own moments
            return a / (a + b), a * (a + 1) / ((a + b) * (a + b + 1))
        k = round(trials / groups)  # this check rolls out every prompt with the same k
        s = np.arange(1, k)
        pmf = stats.betabinom.pmf(s, k, a, b)
        pmf = pmf / pmf.sum()
        return pmf @ (s / k), pmf @ (s * (s - 1) / (k * (k - 1)))

    # -- one step -----------------------------------------------------------------------------------
    def advance(self, step: int) -> None:
        """Waiting steps up to `step` (exclusive): beliefs move, counts forget."""
        while self.step < step:
            self.observe(np.zeros(0, dtype=int), np.zeros(0), np.zeros(0), self.step, (1.0, 1.0))

    def likelihood(self, successes, trials, beta) -> np.ndarray:
        """[n, 3] P(s | state) as the predictor's option reads it."""
        states = (successes > 0).astype(int) + (successes == trials).astype(int)
        if self.o.state_reading == "bucket":
            return np.eye(STATES)[states]
        return np.stack([successes == 0, stats.betabinom.pmf(successes, trials, *beta), successes == trials], -1) * 1.0

    def observe(self, ids, successes, trials, step, beta) -> None:
        """beta: the partial state's (a, b) before this update (checked against the fits by `check_with`)."""
        assert step == self.step
        lam = self.lam["transitions"]
        previous = self.previous_belief()
        alpha = self.prior() + self.own
        states = (successes > 0).astype(int) + (successes == trials).astype(int)
        likelihood = self.likelihood(successes, trials, beta)
        xi = np.zeros((ids.size, STATES, STATES))
        for row, i in enumerate(ids):  # enumerate the previous and the current state
            joint = previous[i][:, None] * alpha[i] / alpha[i].sum(-1, keepdims=True) * likelihood[row]
            xi[row] = joint / joint.sum()
        # every prompt: this step's counts are kept (a waited step), then forget once; rolled-out ones observe
        if self.waited.shape[1] <= self.waits.max():
            self.waited = np.concatenate([self.waited, np.zeros((self.n, 16, STATES, STATES))], 1)
        seen = np.nonzero(self.seen)[0]
        self.waited[seen, self.waits[seen]] = self.own[seen]
        self.waits[seen] += 1
        self.own *= lam
        self.own[ids] += xi
        self.belief[ids] = xi.sum(1)
        self.waits[ids] = 0
        if self.pooled:
            self.pool_counts *= self.lam["pool"] if self.fit_step is not None else 1.0
            np.add.at(self.pool_counts, self.cluster[ids], xi)
        if ids.size:  # the fits fade per step elapsed between updates
            fade = 1.0 if self.fit_step is None else self.lam["fits"] ** (step - self.fit_step)
            part = states == 1
            s, k = successes[part], trials[part]
            self.partial = fade * self.partial + [part.sum(), (s / k).sum(), (s * (s - 1) / (k * (k - 1))).sum(), k.sum()]
            self.first = fade * self.first + xi.sum(1)[~self.seen[ids]].sum(0)
            self.fit_step = step
        self.seen[ids] = True
        self.step = step + 1


STICKY = [[60.0, 1.0, 1.0], [1.0, 60.0, 1.0], [1.0, 1.0, 60.0]]  # a prior chain that mixes slowly: a long
# wait does not reach the stationary belief, so the exponent of the catch-up's matrix power matters


def check(name: str) -> None:
    """Counts that matter (uniform prior), a sticky prior for the long wait, and the state reading
    the predictor does not default to."""
    decay = {"transitions": 0.8, "pool": 0.7, "fits": 0.9}
    check_with(name, {"decay": decay})
    check_with(name, {"decay": decay, "prior_alpha": STICKY})
    other = {"bucket": "posterior", "posterior": "bucket"}[PREDICTORS.get(name).Options().state_reading]
    check_with(name, {"decay": decay, "state_reading": other})


def check_with(name: str, options: dict, steps: int = 10, n: int = 30, k: int = 8, wait: int = 160) -> None:
    """Production's predicted state belief, partial-state Beta, mean and P(0 < S < k) at every step
    (before its outcomes) and after a wait long enough for the catch-up's matrix power (about 70
    exact steps, then a power) equal the eager filter's."""
    cls = PREDICTORS.get(name)
    clusters = torch.arange(n) % 3
    predictor = cls(PromptPool(n, clusters=clusters), cls.Options(**options))
    reference = EagerFilter(predictor)
    generator = torch.Generator().manual_seed(0)
    every = torch.arange(n)
    truth = torch.rand(n, generator=generator)
    truth[:6], truth[6:12] = 0.0, 1.0  # some prompts stay unsolved or solved

    def compare(step: int):
        reference.advance(step)
        produced = predictor.predict(every, step)
        w = reference.predictive_belief()
        a, b = produced.a, produced.b
        gap = np.abs(produced.state_probs.double().numpy() - w).max()
        assert gap < 1e-5, f"{name} ({options}) step {step}: state belief differs from the eager filter by {gap:.2e}"
        # the predictor's fixed point stops 0.007 short of the moments after the first update (a < 1 converges slowly)
        gap = np.abs(np.subtract(reference.cut_moments(a, b), reference.fitted_moments())).max()
        assert gap < 1e-2, f"{name} (prior {options.get('prior_alpha', 1.0)}) step {step}: the partial state's Beta misses the fitted moments by {gap:.2e}"
        mean = w[:, 1] * a / (a + b) + w[:, 2]
        ends = stats.betabinom.pmf(0, k, a, b) + stats.betabinom.pmf(k, k, a, b)
        assert np.abs(produced.mean.double().numpy() - mean).max() < 1e-5, (name, step)
        assert np.abs(produced.p_informative(k).double().numpy() - w[:, 1] * (1 - ends)).max() < 1e-5, (name, step)
        return a, b

    for step in range(steps):
        beta = compare(step)
        ids = torch.nonzero(torch.rand(n, generator=generator) < 0.4).squeeze(1)
        ids = ids[ids < n - 2]  # the last two prompts are never rolled out
        trials = torch.full((ids.shape[0],), float(k))
        successes = torch.binomial(trials, truth[ids], generator=generator)
        predictor.observe(ids, successes, trials, step)
        reference.observe(ids.numpy(), successes.double().numpy(), trials.double().numpy(), step, beta)
    compare(steps + wait)
