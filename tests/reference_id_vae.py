"""Independent inference for `id_vae`'s per-prompt part: code rows and z's forgetting, swept eagerly.

Given the decoder and z the networks hold after an update (the SVI step on the declared program
fits those; `tests/test_programs.py` runs it), each rolled-out prompt's code rows have Gaussian
beliefs and its outcome s ~ Binomial(k, sigmoid(g + a . sum_r row_r)) sees them only through the
scalar eta = a . sum_r row_r. The exact posterior of eta is computed here on a dense grid (NumPy,
not the package's quadrature); the rows' exact posterior means follow from it by Gaussian
conditioning (rows | eta is linear-Gaussian); the rows keep diagonal variances, each precision
gaining a_d^2 g with g (a root found by scipy) such that the variance of eta they imply is the
exact posterior variance.
Every row of the table, and z, forget toward their priors once per step, eagerly (natural
parameters), and predictions are rebuilt from that with the decoder's Jacobian in z taken by
autograd rather than the predictor's closed form.
"""

import numpy as np
import torch
from scipy import optimize, special

from mpts.models import PromptPool
from mpts.models.registry import PREDICTORS

PRIME = 2**31 - 1
OPTIONS = {"hash_buckets": 2**16, "hidden_dim": 8, "latent_dim": 2, "replay_batches": 2,
           "decay": {"z": 0.8, "codes": 0.8}}


def forget(loc, var, prior_var, lam):
    """One step of forgetting of a Gaussian belief toward N(0, prior_var): precision and
    precision-times-mean move (1 - lam) of the way to the prior's."""
    precision = lam / var + (1 - lam) / prior_var
    return lam * (loc / var) / precision, 1 / precision


def eta_posterior(loc, var, offset, successes, trials):
    """E and Var of eta ~ N(loc, var) given s ~ Binomial(k, sigmoid(offset + eta)), on a grid."""
    sd = np.sqrt(var)
    eta = loc[:, None] + sd[:, None] * np.linspace(-14, 14, 8001)[None, :]
    logit = offset[:, None] + eta
    log_weight = (-0.5 * ((eta - loc[:, None]) / sd[:, None]) ** 2 + successes[:, None] * special.log_expit(logit)
                  + (trials - successes)[:, None] * special.log_expit(-logit))
    weight = np.exp(log_weight - log_weight.max(1, keepdims=True))
    weight /= weight.sum(1, keepdims=True)
    mean = (weight * eta).sum(1)
    return mean, (weight * (eta - mean[:, None]) ** 2).sum(1)


class EagerCodes:
    def __init__(self, predictor):
        o = predictor.options
        self.predictor, self.R, self.B = predictor, o.num_hashes, o.hash_buckets
        self.lam = o.decay if isinstance(o.decay, dict) else {"z": o.decay, "codes": o.decay}
        self.prior_var = 1.0 / self.R  # a code (sum of R rows) starts at N(0, I)
        self.loc = np.zeros((self.B, o.embedding_dim))
        self.var = np.full((self.B, o.embedding_dim), self.prior_var)
        self.z_loc, self.z_var = np.zeros(o.latent_dim), np.ones(o.latent_dim)
        self.z_updated = False
        self.step = 0
        state = predictor.state
        self.mult, self.shift = state.hash_mult.numpy(), state.hash_shift.numpy()

    def buckets(self, ids: np.ndarray) -> np.ndarray:
        return (self.mult[None, :] * (ids[:, None] % PRIME) + self.shift[None, :]) % PRIME % self.B

    def advance(self, step: int) -> None:
        while self.step < step:
            self.loc, self.var = forget(self.loc, self.var, self.prior_var, self.lam["codes"])
            if self.z_updated:
                self.z_loc, self.z_var = forget(self.z_loc, self.z_var, 1.0, self.lam["z"])
            self.step += 1

    def decoder(self, ids: torch.Tensor):
        """(features trunk, decode) of the networks as they are now."""
        predictor, features = self.predictor, None
        if predictor.feature_mean is not None:  # standardised pool features, as the networks were built for
            features = (predictor.pool.features[ids].float() - predictor.feature_mean) / predictor.feature_std
        return predictor.nets.trunk_of(features, ids.shape[0])

    def observe(self, ids: torch.Tensor, successes: np.ndarray, trials: np.ndarray) -> None:
        """Condition the rows of these prompts on their outcomes, at the z the update produced."""
        rows = self.buckets(ids.numpy())
        assert np.unique(rows).size == rows.size, "a row shared within one batch: pick another seed"
        state = self.predictor.state
        with torch.no_grad():
            offset, loadings = self.predictor.nets.decode(self.decoder(ids), state.z_loc)
        offset, a = offset.double().numpy(), loadings.double().numpy()  # [n], [n, D]
        loc, var = self.loc[rows], self.var[rows]  # [n, R, D]
        eta_loc = (a[:, None, :] * loc).sum((1, 2))
        eta_var = (a[:, None, :] ** 2 * var).sum((1, 2))
        post_loc, post_var = eta_posterior(eta_loc, eta_var, offset, successes, trials)
        self.loc[rows] = loc + a[:, None, :] * var * ((post_loc - eta_loc) / eta_var)[:, None, None]
        share = a[:, None, :] ** 2 * var  # [n, R, D]: each coordinate's part of Var[eta]
        gain = np.array([optimize.brentq(lambda g: (u / (1 + g * u)).sum() - target, 0.0, u.size / target, xtol=1e-12)
                         if u.sum() > target else 0.0 for u, target in zip(share, post_var)])
        self.var[rows] = 1 / (1 / var + a[:, None, :] ** 2 * gain[:, None, None])
        self.z_loc, self.z_var = state.z_loc.double().numpy(), state.z_scale.double().numpy() ** 2
        self.z_updated = True

    def predictive(self, ids: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Mean and variance of each prompt's logit: exact in the code, first order in z (autograd)."""
        rows = self.buckets(ids.numpy())
        code_loc = torch.from_numpy(self.loc[rows].sum(1)).float()
        code_var = self.var[rows].sum(1)
        trunk = self.decoder(ids).detach()
        nets = self.predictor.nets

        def mean_of(z):
            offset, loadings = nets.decode(trunk, z)
            return offset + (loadings * code_loc).sum(1)

        z = torch.from_numpy(self.z_loc).float()
        with torch.no_grad():
            offset, loadings = nets.decode(trunk, z)
        jacobian = torch.autograd.functional.jacobian(mean_of, z).double().numpy()  # [n, L]
        mean = mean_of(z).detach().double().numpy()
        a = loadings.double().numpy()
        return mean, (a**2 * code_var).sum(1) + (jacobian**2 * self.z_var).sum(1)


def check(name: str = "id_vae", steps: int = 6, n: int = 40, k: int = 8) -> None:
    """Production's code rows after every update and its predictive logit at every step (and after
    a wait) equal the eager reference's, given the networks' decoder and z."""
    generator = torch.Generator().manual_seed(0)
    pool = PromptPool(n, features=torch.randn(n, 6, generator=generator))
    cls = PREDICTORS.get(name)
    predictor = cls(pool, cls.Options(**OPTIONS), seed=0)
    reference = EagerCodes(predictor)
    truth = torch.rand(n, generator=generator)
    every = torch.arange(n)

    def compare(step: int, what: str) -> None:
        reference.advance(step)
        buckets = torch.from_numpy(reference.buckets(every.numpy()))
        loc, var = predictor._rows(buckets, step)
        gap = max(np.abs(loc.double().numpy() - reference.loc[buckets.numpy()]).max(),
                  np.abs(var.double().numpy() / reference.var[buckets.numpy()] - 1).max())
        assert gap < 1e-4, f"{name} step {step} ({what}): code rows differ from the eager reference by {gap:.2e}"
        produced = predictor.predict(every, step)
        mean, variance = reference.predictive(every)
        gap = max(np.abs(produced.loc.double().numpy() - mean).max(),
                  np.abs(produced.scale.double().numpy() ** 2 / variance - 1).max())
        assert gap < 1e-3, f"{name} step {step} ({what}): predictive logit differs from the reference by {gap:.2e}"

    for step in range(steps):
        compare(step, "before its outcomes")
        ids = torch.nonzero(torch.rand(n, generator=generator) < 0.4).squeeze(1)
        ids = ids[ids < n - 4]  # the last four prompts are never rolled out
        trials = torch.full((ids.shape[0],), float(k))
        successes = torch.binomial(trials, truth[ids], generator=generator)
        predictor.observe(ids, successes, trials, step)
        reference.observe(ids, successes.double().numpy(), trials.double().numpy())
        compare(step, "after the update")
    compare(steps + 5, "after a wait")
