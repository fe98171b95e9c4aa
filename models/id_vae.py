"""Identifier-conditioned VAE risk predictor (MPTS): a latent learner state decoded per prompt.

A generative model of the learner's optimisation history, one RL step t at a time::

    z_t ~ N(m', s'^2)                       learner state; prior = last posterior widened toward N(0, I)
    e_i = r[h_1(i)] + ... + r[h_R(i)]       the prompt's code: hashed rows, each r ~ N(its row belief)
    (g_i, a_i) = decoder(pool.features[i], z_t)
    s_i ~ Binomial(k_i, sigmoid(g_i + a_i . e_i))

Identifier features are the prompt's hashed code and its optional pool features. The decoder is
linear in the code, so given z_t the code's uncertainty reaches the logit as an exact Gaussian
term (the per-prompt epistemic term): for a prompt nobody has rolled out (code at its N(0, I)
prior) ``|a_i|`` is the learned spread of prompts with those features; a prompt seen often is sharp.
z_t[0] also lifts every logit directly (a general competence, as ability in item response
theory), which the network refines.

Inference per observe() (SVI on a Pyro model + guide, warm-started by `StreamingSVI`):

- z_t: amortised guide, permutation-invariant: a deep-sets encoder mean-pools (features_i,
  code_i, expected logit_i, s_i / k_i, ...) over the batch into a Gaussian likelihood factor
  that multiplies the prior, so an uninformative batch leaves the prior as it was.
- decoder and encoder weights: point estimates (module parameters of model and guide); streaming ELBO
  E_q[log p(s | z_t)] - KL(q(z_t) || prior), where p(s | z_t) has the code integrated out exactly
  (1-D Gauss-Hermite along a_i). The last few steps' prompts ride along in the likelihood, each
  at the z inferred for its own step: fitted to one step at a time the decoder followed the
  learner with its own weights and z went unused (posterior collapse).
- codes: Bayesian rather than point embeddings (a point embedding trained by Adam fits each
  batch in-sample, and the decoder then learned a collapsed spread: logit z-scores with RMS ~8).
  After the SVI steps each prompt's logit posterior is moment-matched and its rows conditioned
  on it (assumed-density filtering), with no optimiser state per row.

New beliefs over z and the touched rows are written only after the update succeeded, so a
failed update leaves everything as it was.

`predict()` propagates z's uncertainty through the decoder to first order (closed-form Jacobian,
one decoder pass for any number of prompts) and adds the code's variance: a per-prompt
LogitNormal. Rows are brought up to date lazily (forgetting lam**steps waited) when read.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import pyro
import pyro.distributions as dist
import torch
from pydantic import Field, field_validator
from pyro.infer import TraceMeanField_ELBO
from torch import Tensor, nn

from mpts.inference.forgetting import decay_gaussian, decay_option, decay_rates
from mpts.inference.streaming import StreamingSVI, SVIState, WithModule

from .base import PredictorOptions, Program, PromptPool, RiskPredictor, Rows
from .distributions import BinomialLogitNormal, binomial_logit_normal
from .posteriors import LogitNormalPosterior

_PRIME = 2**31 - 1  # universal hashing ((a x + b) mod P) mod B; a, x < 2^31 keeps a x inside int64


DECAY_PARTS = {"z": 0.9, "codes": 0.99}  # lam per step waited of each forgotten belief


class IdentifierVAEOptions(PredictorOptions):
    latent_dim: int = Field(8, ge=1, le=64, description="L: size of the learner-state latent z_t")
    embedding_dim: int = Field(4, ge=1, le=64, description="D: size of each prompt's code e_i")
    hash_buckets: int = Field(2**16, ge=1, le=_PRIME, description="rows of the hashed code table")
    num_hashes: int = Field(2, ge=1, le=8, description="R: rows per prompt id, summed")
    hidden_dim: int = Field(32, ge=1, description="width of the decoder and encoder layers")
    svi_steps: int = Field(3, ge=1, description="SVI steps per observe(), warm-started (more overfit the batch)")
    lr: float = Field(0.02, gt=0.0, le=1.0, description="Adam learning rate of the SVI steps (0, 1]")
    clip_norm: float = Field(10.0, gt=0.0, description="gradient clipping of the SVI steps")
    decay: float | dict[str, float] = decay_option(DECAY_PARTS, "z's posterior (toward N(0, I)) and each code "
                                                                "row's belief (toward its prior)")
    replay_batches: int = Field(8, ge=0, description="recent steps the decoder is refitted on, each at its own z")
    replay_prompts: int = Field(32, ge=1, description="prompts kept from each step for replay")
    use_features: bool = Field(True, description="feed pool.features to decoder and encoder (when the pool has them)")
    seed: int | None = Field(None, description="weights, hashes and SVI draws; None: the run seed")

    @field_validator("decay")
    @classmethod
    def _check_decay(cls, value):
        decay_rates(value, DECAY_PARTS)
        return value


class PromptBlock(NamedTuple):
    """Outcomes of one step's prompts with the belief over their codes before that step."""

    features: Tensor | None  # float32 [n, F], standardised
    rows_loc: Tensor  # [n, R, D] belief over each prompt's code rows
    rows_var: Tensor  # [n, R, D]
    successes: Tensor  # float32 [n]
    trials: Tensor  # float32 [n]


class ObservedBatch(NamedTuple):
    """One observe() call's data, as the model and guide see it.

    `prompts` holds this step's n prompts first, then the replayed prompts of recent steps, each
    of which is decoded at the z inferred at its own step (`replay_z`).
    """

    prompts: PromptBlock
    num_current: int
    prior_loc: Tensor  # [L] belief over z before this batch
    prior_scale: Tensor  # [L]
    replay_z: Tensor  # [m, L], m >= 0


class WidthScaledLinear(nn.Linear):
    """y = W x / in + b with W ~ N(0, in): the same outputs at init as a standard layer, but one
    Adam step (which moves every weight by about lr) moves y by O(lr) rather than O(lr * in).
    Without it a 384-wide text embedding made the first updates diverge."""

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=math.sqrt(self.in_features / 3))  # Var(y) as nn.Linear's init
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x / self.in_features, self.weight, self.bias)


class IdentifierNetworks(nn.Module):
    """Decoder (feature trunk + z-conditioned head giving offset and code loadings) and z-encoder."""

    def __init__(self, feature_dim: int, code_dim: int, latent_dim: int, hidden_dim: int):
        super().__init__()
        self.hidden_dim, self.latent_dim = hidden_dim, latent_dim
        # The z path joins after the per-prompt trunk, so the Jacobian in z is one small matmul.
        self.trunk = (nn.Sequential(WidthScaledLinear(feature_dim, hidden_dim), nn.SiLU(),
                                    nn.Linear(hidden_dim, hidden_dim)) if feature_dim else None)
        self.from_z = nn.Linear(latent_dim, hidden_dim)
        self.head = nn.Linear(hidden_dim, 1 + code_dim)
        with torch.no_grad():  # start at p ~ 0.5 with a broad spread of the logit across prompts
            self.head.weight.mul_(0.1)
            self.head.bias.copy_(torch.cat([torch.zeros(1), torch.full((code_dim,), 1.5 / math.sqrt(code_dim))]))
        # Encoder: deep sets over (features_i, code_i, predicted logit_i, residual_i, rate_i, k_i^-1/2),
        # mean-pooled, log n appended.
        self.phi = nn.Sequential(WidthScaledLinear(feature_dim + code_dim + 4, hidden_dim), nn.SiLU(),
                                 nn.Linear(hidden_dim, hidden_dim), nn.SiLU())
        self.rho = nn.Sequential(nn.Linear(hidden_dim + 1, hidden_dim), nn.SiLU(),
                                 nn.Linear(hidden_dim, 2 * latent_dim))
        with torch.no_grad():  # each prompt starts out worth precision ~0.1 about z (see `encode`)
            self.rho[-1].bias[latent_dim:].fill_(-2.3)

    def trunk_of(self, features: Tensor | None, n: int) -> Tensor:
        return self.trunk(features) if self.trunk is not None else torch.zeros(n, self.hidden_dim)

    def decode(self, trunk: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """Offset g [n] and code loadings a [n, D] of the logit g + a . e, at one z [L] or one per prompt [n, L].

        z_0 enters the offset directly with weight one (general competence); without that path a
        change of the learner was absorbed by the prompts' codes instead of z.
        """
        out = self.head(nn.functional.silu(trunk + self.from_z(z)))
        return out[:, 0] + z[..., 0], out[:, 1:]

    def decode_belief(self, trunk: Tensor, z_loc: Tensor, z_scale: Tensor, code_loc: Tensor,
                      code_var: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of the logit with z ~ N(z_loc, z_scale^2) and e ~ N(code_loc, code_var).

        Exact in e given z; first order (delta method) in z with the Jacobian in closed form.
        """
        pre = trunk + self.from_z(z_loc)
        gate = torch.sigmoid(pre)
        out = self.head(pre * gate)
        offset, loadings = out[:, 0] + z_loc[0], out[:, 1:]
        mean = offset + (loadings * code_loc).sum(1)
        slope = gate * (1 + pre * (1 - gate))  # silu'(pre)
        head_weight = self.head.weight[0] + code_loc @ self.head.weight[1:]  # d mean / d hidden, [n, H]
        jacobian = (slope * head_weight) @ self.from_z.weight  # [n, L]
        jacobian[:, 0] += 1.0  # the direct competence path
        variance = (loadings.square() * code_var).sum(1) + (jacobian * z_scale).square().sum(1)
        return mean, variance

    def encode(self, features: Tensor | None, trunk: Tensor, code_loc: Tensor, successes: Tensor, trials: Tensor,
               prior_loc: Tensor, prior_scale: Tensor) -> tuple[Tensor, Tensor]:
        """q(z_t) = prior x a Gaussian factor read off the batch; returns (loc, scale).

        Each pair also carries the decoder's prediction at the prior mean (as data, not as a
        path for gradients), so the encoder reads how the batch departs from what was expected.
        """
        with torch.no_grad():
            offset, loadings = self.decode(trunk, prior_loc)
            expected = offset + (loadings * code_loc).sum(1)
        rate = successes / trials
        parts = [code_loc, (expected / 4).unsqueeze(1), (rate - torch.sigmoid(expected)).unsqueeze(1),
                 rate.unsqueeze(1), trials.rsqrt().unsqueeze(1)]
        if features is not None and self.trunk is not None:
            parts.insert(0, features)
        pooled = self.phi(torch.cat(parts, dim=1)).mean(0)
        size = torch.tensor([math.log(code_loc.shape[0]) / 8.0], dtype=pooled.dtype)
        factor_loc, log_precision = self.rho(torch.cat([pooled, size])).split(self.latent_dim)
        # Evidence adds up over prompts (Fisher information), so the factor's precision is n times a
        # per-prompt precision read off the pooled summary, on the log scale Adam moves easily.
        factor_precision = code_loc.shape[0] * log_precision.clamp(max=10.0).exp()
        prior_precision = prior_scale.pow(-2)
        precision = prior_precision + factor_precision
        loc = (prior_precision * prior_loc + factor_precision * factor_loc) / precision
        return loc, precision.rsqrt()


def code_logit(rows_loc: Tensor, rows_var: Tensor, loadings: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """eta = a . sum_r row_r: its mean [n], variance [n], and Cov(row, eta) per coordinate [n, R, D]."""
    weighted = loadings.unsqueeze(1) * rows_var
    eta_loc = (loadings.unsqueeze(1) * rows_loc).sum((1, 2))
    eta_var = (loadings.unsqueeze(1) * weighted).sum((1, 2)).clamp_min(1e-8)
    return eta_loc, eta_var, weighted


def logit_posterior(eta_loc: Tensor, eta_var: Tensor, offset: Tensor, successes: Tensor,
                    trials: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """eta ~ N(eta_loc, eta_var), s ~ Binomial(k, sigmoid(offset + eta)): log p(s), E[eta | s], Var[eta | s]
    (the package's one Binomial-LogitNormal quadrature, `distributions.binomial_logit_normal`)."""
    log_marginal, post_loc, post_var = binomial_logit_normal(offset + eta_loc, eta_var.sqrt(), successes, trials,
                                                             moments=True)
    return log_marginal, post_loc - offset, post_var.clamp(max=eta_var)


def condition_rows(rows_loc: Tensor, rows_var: Tensor, offset: Tensor, loadings: Tensor,
                   successes: Tensor, trials: Tensor) -> tuple[Tensor, Tensor]:
    """Belief over each prompt's code rows after its outcome (assumed-density filtering).

    The outcome sees the rows only through eta = a . sum_r row_r, 1-D and Gaussian a priori. Its
    posterior is moment-matched (`logit_posterior`), and the rows' means are conditioned on it
    exactly. The rows keep independent (diagonal) variances, so one precision gain g on eta is
    spread over the rows' coordinates as a_d^2 g, with g chosen so that the variance of eta the
    rows then imply, sum a_d^2 var_rd, is the posterior's. (The diagonal of the joint posterior
    precision, g = 1/post_var - 1/prior_var, left that variance ~2.4x too wide after one outcome:
    the evidence on eta was diluted over R*D coordinates, and predictions were underconfident;
    simulation-based calibration in tests/test_sbc.py.)
    Shapes: rows [n, R, D], offset [n], loadings [n, D], counts [n].
    """
    eta_loc, eta_var, weighted = code_logit(rows_loc, rows_var, loadings)
    _, post_loc, post_var = logit_posterior(eta_loc, eta_var, offset, successes, trials)
    shift = ((post_loc - eta_loc) / eta_var)[:, None, None]
    share = loadings.unsqueeze(1).square() * rows_var  # each coordinate's part of Var[eta]
    gain = _precision_gain(share.flatten(1).double(), post_var.double()).to(rows_var.dtype)[:, None, None]
    return rows_loc + weighted * shift, 1 / (1 / rows_var + loadings.unsqueeze(1).square() * gain)


def _precision_gain(share: Tensor, target: Tensor, iterations: int = 12) -> Tensor:
    """g >= 0 with h(g) = sum_i share_i / (1 + g share_i) = target, per row, by Newton's method.

    h is convex and decreasing, so Newton steps from a point left of the root stay left of it and
    converge monotonically; g = 1/target - 1/h(0) (the diagonal of the joint precision) is such a
    point, since h is subadditive in the shares: h(g) >= h(0) / (1 + g h(0)) = target there.
    """
    gain = (1 / target - 1 / share.sum(1)).clamp_min(0.0)
    for _ in range(iterations):
        spread = share / (1 + gain.unsqueeze(1) * share)
        gain = gain + (spread.sum(1) - target) / spread.square().sum(1).clamp_min(1e-30)
    return gain


def model(nets: IdentifierNetworks, batch: ObservedBatch) -> None:
    block = batch.prompts
    z = pyro.sample("z", dist.Normal(batch.prior_loc, batch.prior_scale).to_event(1))
    # Recent steps ride along, each at the z inferred for it: the decoder has to explain several
    # steps at once, so it cannot follow the learner itself and leave z unused (posterior collapse).
    z_each = torch.cat([z.expand(batch.num_current, -1), batch.replay_z])
    n = block.successes.shape[0]
    offset, loadings = nets.decode(nets.trunk_of(block.features, n), z_each)
    # s_i ~ Binomial(k_i, sigmoid(g_i + a_i . e_i)) with the code e_i integrated out exactly (1-D).
    eta_loc, eta_var, _ = code_logit(block.rows_loc, block.rows_var, loadings)
    with pyro.plate("prompts", n):
        pyro.sample("s", BinomialLogitNormal(block.trials, offset + eta_loc, eta_var.sqrt()), obs=block.successes)


def guide(nets: IdentifierNetworks, batch: ObservedBatch) -> None:
    current = _head(batch.prompts, batch.num_current)
    trunk = nets.trunk_of(current.features, batch.num_current)
    z_loc, z_scale = nets.encode(current.features, trunk, current.rows_loc.sum(1), current.successes,
                                 current.trials, batch.prior_loc, batch.prior_scale)
    pyro.sample("z", dist.Normal(z_loc, z_scale).to_event(1))


def _head(block: PromptBlock, n: int) -> PromptBlock:
    return PromptBlock(*(None if part is None else part[:n] for part in block))


def hash_ids(ids: Tensor, mult: Tensor, shift: Tensor, buckets: int) -> Tensor:
    """Row of each id under each hash function, shape [n, R]."""
    x = (ids % _PRIME).unsqueeze(1)
    return (mult * x + shift) % _PRIME % buckets


@dataclasses.dataclass(frozen=True)
class VAEState:
    engine: SVIState  # decoder and encoder weights with their Adam moments
    seed: Tensor  # int64 scalar: seeds the SVI draws and the replay subsamples
    hash_mult: Tensor  # int64 [R]: the hash functions of prompt ids
    hash_shift: Tensor
    row_loc: Tensor  # float32 [B, D]: belief over each hashed code row
    row_var: Tensor
    row_step: Tensor  # int32 [B]: step of each row's last update
    z_loc: Tensor  # float32 [L]: belief over z after the last update
    z_scale: Tensor
    last_step: Tensor  # int64 scalar: step of the last update; -1: z is still at its prior
    num_updates: Tensor  # int64 scalar
    replay_ids: Tensor  # int64 [S, P]: the last S steps' kept prompts, oldest slot first
    replay_rows_loc: Tensor  # [S, P, R, D]: their code beliefs before that step
    replay_rows_var: Tensor
    replay_successes: Tensor  # [S, P]
    replay_trials: Tensor
    replay_z: Tensor  # [S, L]: z inferred at that step
    replay_size: Tensor  # int64 [S]: prompts kept in each slot (0: empty)


class IdentifierVAE(RiskPredictor):
    name = "id_vae"
    Options = IdentifierVAEOptions

    def __init__(self, pool: PromptPool, options: IdentifierVAEOptions | None = None, seed: int = 0):
        super().__init__(pool, options, seed)
        o = self.options
        self.rates = decay_rates(o.decay, DECAY_PARTS)
        self.seed_used = o.seed if o.seed is not None else seed
        generator = torch.Generator().manual_seed(self.seed_used)
        hash_mult = torch.randint(1, _PRIME, (o.num_hashes,), generator=generator)
        hash_shift = torch.randint(0, _PRIME, (o.num_hashes,), generator=generator)
        self.feature_mean, self.feature_std = self._feature_moments()
        feature_dim = 0 if self.feature_mean is None else self.feature_mean.shape[0]
        with torch.random.fork_rng(devices=[]):  # seeded weights without touching the global stream
            torch.manual_seed(self.seed_used)
            self.nets = IdentifierNetworks(feature_dim, o.embedding_dim, o.latent_dim, o.hidden_dim)
        self.engine = StreamingSVI(WithModule(model, self.nets), WithModule(guide, self.nets), steps=o.svi_steps,
                                   lr=o.lr, clip_norm=o.clip_norm, loss=TraceMeanField_ELBO())
        # Rows start at N(0, 1/R) so that a prompt's code (the sum of its R rows) starts at N(0, I).
        self.row_prior_var = 1.0 / o.num_hashes
        slots, kept, code = max(o.replay_batches, 1), o.replay_prompts, (o.num_hashes, o.embedding_dim)
        self.state = VAEState(
            engine=self.engine.init(), seed=torch.tensor(self.seed_used), hash_mult=hash_mult, hash_shift=hash_shift,
            row_loc=torch.zeros(o.hash_buckets, o.embedding_dim),
            row_var=torch.full((o.hash_buckets, o.embedding_dim), self.row_prior_var),
            row_step=torch.zeros(o.hash_buckets, dtype=torch.int32),
            z_loc=torch.zeros(o.latent_dim), z_scale=torch.ones(o.latent_dim),
            last_step=torch.tensor(-1), num_updates=torch.tensor(0),
            replay_ids=torch.zeros(slots, kept, dtype=torch.int64), replay_rows_loc=torch.zeros(slots, kept, *code),
            replay_rows_var=torch.ones(slots, kept, *code), replay_successes=torch.zeros(slots, kept),
            replay_trials=torch.ones(slots, kept), replay_z=torch.zeros(slots, o.latent_dim),
            replay_size=torch.zeros(slots, dtype=torch.int64))

    # -- identifier features ----------------------------------------------------------------------
    def _feature_moments(self) -> tuple[Tensor | None, Tensor | None]:
        """Column mean/std of pool.features (from up to ~65536 rows), to standardise inputs."""
        features = self.pool.features
        if not self.options.use_features or features is None:
            return None, None
        if features.dim() != 2:
            raise ValueError(f"pool.features must be 2-D [prompts, dims], got shape {tuple(features.shape)}")
        rows = features[:: max(1, features.shape[0] // 65536)].float()
        return rows.mean(0), rows.std(0, correction=0).clamp_min(1e-6)

    def _features(self, ids: Tensor) -> Tensor | None:
        if self.feature_mean is None:
            return None
        return (self.pool.features[ids].float() - self.feature_mean) / self.feature_std

    def _buckets(self, ids: Tensor) -> Tensor:
        return hash_ids(ids, self.state.hash_mult, self.state.hash_shift, self.options.hash_buckets)

    def _rows(self, buckets: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """Belief over these rows as of `step`, forgetting of the steps they waited applied."""
        loc, var = self.state.row_loc[buckets], self.state.row_var[buckets]
        if self.rates["codes"] < 1.0:
            waited = (step - self.state.row_step[buckets]).clamp_min(0).unsqueeze(-1)
            loc, scale = decay_gaussian(loc, var.sqrt(), 0.0, math.sqrt(self.row_prior_var),
                                        self.rates["codes"], waited)
            var = scale.square()
        return loc, var

    # -- the belief over z --------------------------------------------------------------------------
    def z_belief(self, step: int) -> tuple[Tensor, Tensor]:
        """(loc, scale) of z at `step`: the last posterior, widened toward N(0, I) per step waited."""
        state = self.state
        if int(state.last_step) < 0:
            return state.z_loc, state.z_scale
        waited = max(step - int(state.last_step), 0)
        return decay_gaussian(state.z_loc, state.z_scale, 0.0, 1.0, self.rates["z"], waited)

    # -- predictor interface ------------------------------------------------------------------------
    def _predict(self, ids: Tensor, step: int) -> LogitNormalPosterior:
        z_loc, z_scale = self.z_belief(step)
        rows_loc, rows_var = self._rows(self._buckets(ids), step)
        with torch.no_grad():
            trunk = self.nets.trunk_of(self._features(ids), ids.shape[0])
            mean, variance = self.nets.decode_belief(trunk, z_loc, z_scale, rows_loc.sum(1), rows_var.sum(1))
        return LogitNormalPosterior(mean, variance.sqrt())

    def program(self, ids: Tensor, successes: Tensor, trials: Tensor, step: int) -> Program:
        """This step's prompts (and the replayed ones) under z's forgetting-tempered prior."""
        ids, step = self.check_ids(ids), int(step)
        prior_loc, prior_scale = self.z_belief(step)
        rows_loc, rows_var = self._rows(self._buckets(ids), step)
        current = PromptBlock(self._features(ids), rows_loc, rows_var, successes, trials)
        prompts, replay_z = self._with_replay(current)
        batch = ObservedBatch(prompts, ids.shape[0], prior_loc, prior_scale, replay_z)
        objective = self.engine.objective
        return Program(objective.model, objective.guide, (batch,), "svi", engine=self.engine, state=self.state.engine,
                       seed=int(self.state.seed) * 1_000_003 + int(self.state.num_updates))

    def _observe(self, ids: Tensor, successes: Tensor, trials: Tensor, step: int):
        program = self.program(ids, successes, trials, step)
        batch = program.args[0]
        engine, info = self.engine.update(program.state, *program.args, seed=program.seed)
        if "failed" in info:  # the engine put the old weights back
            raise RuntimeError(f"id_vae update failed, state unchanged: {info['failed']}")
        try:  # the modules hold the new weights; the state gets them only with everything below
            current = _head(batch.prompts, batch.num_current)
            with torch.no_grad():
                trunk = self.nets.trunk_of(current.features, ids.shape[0])
                z_loc, z_scale = self.nets.encode(current.features, trunk, current.rows_loc.sum(1), successes, trials,
                                                  batch.prior_loc, batch.prior_scale)
                offset, loadings = self.nets.decode(trunk, z_loc)
                new_loc, new_var = condition_rows(current.rows_loc, current.rows_var, offset, loadings,
                                                  successes, trials)
            changes = {"engine": engine, **self._rows_written(self._buckets(ids), current.rows_loc, current.rows_var,
                                                               new_loc, new_var, step),
                       **self._remembered(ids, current, z_loc),
                       "z_loc": z_loc, "z_scale": z_scale, "last_step": torch.tensor(step),
                       "num_updates": self.state.num_updates + 1}
        except BaseException:
            self.engine.write(self.state.engine)
            raise
        return changes, {"elbo": info["elbo"]}

    def _state_changed(self) -> None:
        self.engine.write(self.state.engine)  # the networks compute with the state's weights

    def _remembered(self, ids: Tensor, block: PromptBlock, z: Tensor) -> dict[str, Tensor]:
        """The replay slots with (a seeded subsample of) this step's outcomes added as the newest."""
        o, state = self.options, self.state
        if o.replay_batches == 0:
            return {}
        generator = torch.Generator().manual_seed(int(state.seed) * 7_919 + int(state.num_updates))
        keep = torch.randperm(ids.shape[0], generator=generator)[: o.replay_prompts]
        size = keep.shape[0]

        def shifted(old: Tensor, new: Tensor) -> Tensor:
            out = old.roll(-1, 0)  # drop the oldest slot; the newest goes last
            out[-1] = 0
            out[-1, :size] = new
            return out

        return {"replay_ids": shifted(state.replay_ids, ids[keep]),
                "replay_rows_loc": shifted(state.replay_rows_loc, block.rows_loc[keep]),
                "replay_rows_var": shifted(state.replay_rows_var, block.rows_var[keep]),
                "replay_successes": shifted(state.replay_successes, block.successes[keep]),
                "replay_trials": shifted(state.replay_trials, block.trials[keep]),
                "replay_z": torch.cat([state.replay_z[1:], z.unsqueeze(0)]),
                "replay_size": torch.cat([state.replay_size[1:], torch.tensor([size])])}

    def _with_replay(self, current: PromptBlock) -> tuple[PromptBlock, Tensor]:
        """This step's prompts followed by the replayed ones (oldest step first), and the z of each."""
        state = self.state
        if self.options.replay_batches == 0 or int(state.replay_size.sum()) == 0:
            return current, torch.zeros(0, self.options.latent_dim)
        used = torch.arange(state.replay_ids.shape[1]).unsqueeze(0) < state.replay_size.unsqueeze(1)  # [S, P]
        ids = state.replay_ids[used]
        features = None if current.features is None else torch.cat([current.features, self._features(ids)])
        block = PromptBlock(features, torch.cat([current.rows_loc, state.replay_rows_loc[used]]),
                            torch.cat([current.rows_var, state.replay_rows_var[used]]),
                            torch.cat([current.successes, state.replay_successes[used]]),
                            torch.cat([current.trials, state.replay_trials[used]]))
        replay_z = state.replay_z.unsqueeze(1).expand(-1, used.shape[1], -1)[used]
        return block, replay_z

    def _rows_written(self, buckets: Tensor, old_loc: Tensor, old_var: Tensor, new_loc: Tensor,
                      new_var: Tensor, step: int) -> dict[str, Rows]:
        """The touched rows' new beliefs; a row shared by several prompts of the batch adds up their
        updates (mean shifts, and precision gains, as independent evidence would)."""
        flat = buckets.reshape(-1)
        rows, inverse, first = _first_occurrence(flat)
        dim = old_loc.shape[-1]
        loc = old_loc.reshape(-1, dim)[first].index_add(0, inverse, (new_loc - old_loc).reshape(-1, dim))
        gain = (1 / new_var - 1 / old_var).reshape(-1, dim)
        precision = (1 / old_var).reshape(-1, dim)[first].index_add(0, inverse, gain)
        return {"row_loc": Rows(rows, loc), "row_var": Rows(rows, 1 / precision),
                "row_step": Rows(rows, torch.full_like(rows, step, dtype=torch.int32))}


def _first_occurrence(values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Unique values, each value's slot among them, and where each unique value first occurs."""
    unique, inverse = torch.unique(values, sorted=True, return_inverse=True)
    first = torch.full((unique.shape[0],), values.shape[0], dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(values.shape[0]), reduce="amin")
    return unique, inverse, first
