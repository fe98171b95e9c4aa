"""Sparse variational GP over prompt embeddings: predicts prompts it has never rolled out.

Generative model (Hensman et al. 2015, whitened inducing values, logit link):

    u ~ Normal(0, I_M)                                   inducing values at Z (M prompts)
    f(x) = m + K_xZ K_ZZ^{-1/2} u (+ what Z misses)     smooth logit over the embedding
    e_j ~ Normal(0, sigma^2)                              what the embedding does not explain
    s_j ~ Binomial(k_j, sigmoid(f(x_j) + e_j))  ** w_j    w_j = lam ** (step - step_j)

The residual e: prompts that sit close together in embedding space can still differ a lot in
difficulty (on the simulator's features a linear fit on features and true cluster leaves a
logit residual of sd ~1.3-1.5). Without it the model explains every outcome by the smooth f,
whose posterior is rightly sure of the *local average*, so its intervals for one prompt's p
were ~6x too narrow (90% predictive intervals covered ~0.55). e is integrated out in the
likelihood (`BinomialLogitNormal`, an over-dispersed Binomial) and sigma is fitted by the same
ELBO; the predictive for a prompt is then LogitNormal(mean_f, var_f + sigma^2). Each visit gets
its own e (a prompt's earlier outcomes inform it only through f), which keeps the model
stateless per prompt and its predictive calibrated; `residual_scale_init=0` drops the term.

Pyro integration: GPyTorch's own `ApproximateGP.pyro_model` / `pyro_guide`. The inducing values
are then an ordinary Pyro sample site ("gp.u", KL to the prior analytic under
`TraceMeanField_ELBO`), the Binomial likelihood is an ordinary observe statement, and age
weights and minibatching are Pyro's own `poutine.scale` and `plate(subsample_size=...)`. The
kernel, mean and variational parameters are the GP module's own parameters, fitted by the
shared functional engine (`inference.streaming.StreamingSVI`, no global parameter store), so
this predictor gets the same warm start, clipped Adam and rollback-on-failure as every other
one. (GPyTorch's `VariationalELBO` would have needed a custom GPyTorch likelihood and a second
optimiser loop outside the engine.)

Non-stationarity: exponential forgetting through a bounded replay buffer of recent
observations (prompt id, s, k, step), each weighted lam ** age in the likelihood. For a
Beta-Bernoulli model this is exactly MoPPS' decay toward the prior, so the GP forgets at the
rate the other predictors do, and `decay` means the same thing across predictors. A time
kernel (step as an input) was the alternative; it needs inducing points that move forward in
time and extrapolates the time trend at the edge of the data, where a stationary kernel
reverts to the mean; weighting old outcomes down is simpler, bounded and easy to check.
Every update refits the whole buffer (minibatched), so the GP does not drift toward whatever
the latest batch happened to contain.

Inputs: the pool's feature rows, centred and projected onto their top `pca_dim` principal
components (fitted once on a sample of the pool). This keeps kernel evaluations cheap and puts
a stationary kernel on the directions where the prompts actually differ. Inducing points are a
seeded random subset of the pool's prompts (fixed by default: the pool is known in advance).
Kernel lengthscale, output scale and constant mean are fitted by the same ELBO unless
`learn_hyperparameters=False`.

`predict` reads the GP as the last `observe` left it (its `step` is not used: forgetting acts
when outcomes are folded in). Prompts never rolled out get the GP's prediction at their
embedding, reverting to the fitted mean far from any observed prompt.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import pyro
import pyro.distributions as dist
import torch
from pydantic import Field
from pyro.infer import TraceMeanField_ELBO
from torch import Tensor

from mpts.inference.forgetting import factor
from mpts.inference.streaming import StreamingSVI, SVIState, WithModule

from .base import PredictorOptions, Program, PromptPool, RiskPredictor, TensorDict
from .distributions import BinomialLogitNormal
from .extras import import_extra
from .posteriors import LogitNormalPosterior

gpytorch = import_extra("gpytorch", "gp")
psd_safe_cholesky = import_extra("linear_operator.utils.cholesky", "gp").psd_safe_cholesky

_PCA_SAMPLE = 20_000  # rows of the pool used to fit the projection
_PREDICT_CHUNK = 8192  # candidates per GP evaluation, bounds memory for huge candidate sets
_MODULE_NAME = "gp"


class EmbeddingGPOptions(PredictorOptions):
    num_inducing: int = Field(256, ge=1, description="M inducing points (capped at the pool size)")
    kernel: Literal["rbf", "matern52", "matern32"] = "rbf"
    lengthscale_init: float | None = Field(None, gt=0.0, description="None: median distance between inducing points")
    outputscale_init: float = Field(1.0, gt=0.0, description="prior variance of the logit")
    residual_scale_init: float = Field(1.0, ge=0.0, description=(
        "sigma: sd of each prompt's logit around the smooth GP (what the embedding does not explain), "
        "fitted with the kernel; 0: no residual term"))
    ard: bool = Field(False, description="one lengthscale per input dimension")
    learn_inducing_locations: bool = False
    learn_hyperparameters: bool = Field(True, description="fit kernel and mean by the ELBO; False: keep their initial values")
    pca_dim: int | None = Field(64, ge=1, description="project features on this many principal components; None: raw")
    svi_steps: int = Field(4, ge=1, description="SVI steps per observe() call (warm-started)")
    lr: float = Field(0.1, gt=0.0, le=1.0, description="Adam step size (ClippedAdam, as the engine sets it up), (0, 1]")
    num_particles: int = Field(1, ge=1, description="Monte Carlo draws of f per SVI step")
    decay: float = Field(0.9, gt=0.0, le=1.0, description="lam: an outcome `age` steps old has weight lam**age")
    buffer_size: int = Field(8192, ge=1, description="most recent observations kept for refitting")
    minibatch_size: int = Field(512, ge=1, description="buffer rows per SVI step")
    seed: int | None = Field(None, description="overrides the run seed for this predictor's randomness")


class LogitGP(gpytorch.models.ApproximateGP):
    """The latent logit f: constant mean, scaled stationary kernel, whitened inducing values."""

    def __init__(self, inducing_points: Tensor, kernel: str, lengthscale: float, outputscale: float,
                 residual_scale: float, ard: bool, learn_inducing_locations: bool, learn_hyperparameters: bool):
        variational = gpytorch.variational.CholeskyVariationalDistribution(inducing_points.shape[0])
        strategy = gpytorch.variational.VariationalStrategy(
            self, inducing_points, variational, learn_inducing_locations=learn_inducing_locations)
        super().__init__(strategy)
        ard_dims = inducing_points.shape[1] if ard else None
        if kernel == "rbf":
            base = gpytorch.kernels.RBFKernel(ard_num_dims=ard_dims)
        else:
            base = gpytorch.kernels.MaternKernel(nu=2.5 if kernel == "matern52" else 1.5, ard_num_dims=ard_dims)
        base.lengthscale = torch.full_like(base.lengthscale, lengthscale)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(base)
        self.covar_module.outputscale = outputscale
        # sigma = softplus(raw), as GPyTorch constrains its own scales; absent when 0 (no residual term)
        self.has_residual = residual_scale > 0
        if self.has_residual:
            self.raw_residual_scale = torch.nn.Parameter(
                torch.tensor(residual_scale).expm1().log() if residual_scale < 20 else torch.tensor(residual_scale),
                requires_grad=learn_hyperparameters)
        if not learn_hyperparameters:  # frozen: SVI fits only q(u) (and inducing locations if asked)
            for module in (self.mean_module, self.covar_module):
                module.requires_grad_(False)

    @property
    def residual_scale(self) -> Tensor | None:
        """sigma, the sd of a prompt's logit around f; None without the residual term."""
        return torch.nn.functional.softplus(self.raw_residual_scale) if self.has_residual else None

    def forward(self, x: Tensor) -> gpytorch.distributions.MultivariateNormal:
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def model(gp: LogitGP, x: Tensor, successes: Tensor, trials: Tensor, weights: Tensor,
          minibatch_size: int | None) -> None:
    observations = pyro.plate("observations", x.shape[0], subsample_size=minibatch_size, dim=-1)
    idx = observations.indices
    f_prior = gp.pyro_model(x[idx], name_prefix=_MODULE_NAME)  # samples "gp.u" ~ p(u)
    with observations, pyro.poutine.scale(scale=weights[idx]):
        f = pyro.sample(f"{_MODULE_NAME}.f", f_prior)  # masked: q(f) is implied by q(u)
        pyro.sample(f"{_MODULE_NAME}.s", likelihood(gp, trials[idx], f), obs=successes[idx])


def likelihood(gp: LogitGP, trials: Tensor, f: Tensor) -> dist.TorchDistribution:
    """p(s | f): Binomial(k, sigmoid(f + e)) with the residual e ~ Normal(0, sigma^2) integrated out."""
    sigma = gp.residual_scale
    if sigma is None:
        return dist.Binomial(trials, logits=f)
    return BinomialLogitNormal(trials, f, sigma.expand_as(f), validate_args=False)


def guide(gp: LogitGP, x: Tensor, successes: Tensor, trials: Tensor, weights: Tensor,
          minibatch_size: int | None) -> None:
    gp.train()  # drops GPyTorch's memo of q(u), whose graph the previous step's backward freed
    observations = pyro.plate("observations", x.shape[0], subsample_size=minibatch_size, dim=-1)
    f_posterior = gp.pyro_guide(x[observations.indices], name_prefix=_MODULE_NAME)  # samples "gp.u" ~ q(u)
    with observations:
        pyro.sample(f"{_MODULE_NAME}.f", f_posterior)


def principal_projection(features: Tensor, dim: int | None, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(mean [D], basis [D, q]) of the top-`dim` principal components of a sample of rows."""
    n, d = features.shape
    rows = features if n <= _PCA_SAMPLE else features[torch.randperm(n, generator=generator)[:_PCA_SAMPLE]]
    rows = rows.to(torch.float64)
    mean = rows.mean(0)
    if dim is None or dim >= d:
        return mean.float(), torch.eye(d)
    covariance = (rows - mean).T @ (rows - mean) / max(rows.shape[0] - 1, 1)
    _, vectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
    return mean.float(), vectors[:, -dim:].flip(1).float().contiguous()


@dataclasses.dataclass(frozen=True)
class GPState:
    engine: SVIState  # kernel, mean and variational parameters with their Adam moments
    fixed: TensorDict  # the GP's other tensors: inducing points, frozen hyperparameters, flags
    generator: Tensor  # uint8: state of the generator that seeds each update's subsamples and draws
    buffer_ids: Tensor  # int64 [buffer_size]
    buffer_successes: Tensor  # float32 [buffer_size]
    buffer_trials: Tensor
    buffer_steps: Tensor  # int64 [buffer_size]: step each outcome was observed at
    buffer_inputs: Tensor  # float32 [buffer_size, q]: its GP input
    buffer_count: Tensor  # int64 scalar: rows filled
    buffer_head: Tensor  # int64 scalar: next row to overwrite


class EmbeddingGP(RiskPredictor):
    name = "gp"
    Options = EmbeddingGPOptions

    def __init__(self, pool: PromptPool, options: EmbeddingGPOptions | None = None, seed: int = 0):
        super().__init__(pool, options, seed)
        o = self.options
        self.features = _checked_features(pool)
        seed = self.seed = o.seed if o.seed is not None else seed
        generator = torch.Generator().manual_seed(seed)
        self.feature_mean, self.projection = principal_projection(self.features, o.pca_dim, generator)

        num_inducing = min(o.num_inducing, self.num_prompts)
        inducing_ids = torch.randperm(self.num_prompts, generator=generator)[:num_inducing]
        inducing_points = self.inputs(inducing_ids)
        lengthscale = o.lengthscale_init if o.lengthscale_init is not None else _median_distance(inducing_points)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.gp = LogitGP(inducing_points, o.kernel, lengthscale, o.outputscale_init, o.residual_scale_init,
                              o.ard, o.learn_inducing_locations, o.learn_hyperparameters)
            with torch.no_grad():  # initialise q(u) to the prior now, so every parameter exists from the start
                self.gp.train()
                self.gp(inducing_points[:1])

        loss = TraceMeanField_ELBO(num_particles=o.num_particles, vectorize_particles=o.num_particles > 1,
                                   max_plate_nesting=1)
        self.engine = StreamingSVI(WithModule(model, self.gp), WithModule(guide, self.gp), steps=o.svi_steps,
                                   lr=o.lr, loss=loss)
        size, width = o.buffer_size, self.projection.shape[1]
        self.state = GPState(
            engine=self.engine.init(), fixed=self._fixed_tensors(), generator=generator.get_state(),
            # Replay buffer: a ring of the most recent observations, with their GP inputs (no re-projection per refit)
            buffer_ids=torch.zeros(size, dtype=torch.int64), buffer_successes=torch.zeros(size),
            buffer_trials=torch.zeros(size), buffer_steps=torch.zeros(size, dtype=torch.int64),
            buffer_inputs=torch.zeros(size, width), buffer_count=torch.tensor(0), buffer_head=torch.tensor(0))
        self._state_changed()

    # -- inputs -----------------------------------------------------------------------------
    def inputs(self, ids: Tensor) -> Tensor:
        """GP inputs of these prompts: centred, projected features (float32 [n, q])."""
        return self.features[ids].float() @ self.projection - self.feature_mean @ self.projection

    # -- predict ----------------------------------------------------------------------------
    def _predict(self, ids: Tensor, step: int) -> LogitNormalPosterior:
        """p = sigmoid(f + e): the GP's posterior of f plus the residual's variance."""
        loc, scale = self.latent(ids)
        sigma = self.gp.residual_scale
        if sigma is not None:
            scale = (scale.square() + float(sigma.detach()) ** 2).sqrt()
        return LogitNormalPosterior(loc=loc, scale=scale)

    def latent(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior mean and standard deviation of the smooth logit f (no residual) for these prompts.

        Same numbers as GPyTorch's eval-mode `gp(x)` (a test checks), with everything that does
        not depend on x folded once per update into `self._predictive` (float64):
        mean = m(x) + K_xZ L^-T mu and var = k(x, x) + K_xZ L^-T (S - I) L^-1 K_Zx, so a batch
        of candidates costs one [n, M] x [M, M] product instead of a triangular solve and two
        products.
        """
        mean_weights, middle = self._predictive
        gp, inducing = self.gp, self.gp.variational_strategy.inducing_points
        jitter = self.gp.variational_strategy.jitter_val
        locs, scales = [], []
        with torch.no_grad():
            for chunk in ids.split(_PREDICT_CHUNK):
                x = self.inputs(chunk)
                cross = gp.covar_module(x, inducing).to_dense().double()  # K_xZ [n, M]
                loc = gp.mean_module(x).double() + cross @ mean_weights
                prior_var = gp.covar_module(x, diag=True).double() + jitter
                var = prior_var + ((cross @ middle) * cross).sum(-1)
                locs.append(loc.float())
                scales.append(var.clamp_min(1e-10).sqrt().float())
        return torch.cat(locs), torch.cat(scales)

    def _predictive_terms(self) -> tuple[Tensor, Tensor]:
        """(L^-T mu, L^-T (S - I) L^-1) in float64, from the GP's current parameters."""
        strategy = self.gp.variational_strategy
        with torch.no_grad():
            inducing = strategy.inducing_points
            k_zz = self.gp.covar_module(inducing).add_jitter(strategy.jitter_val).to_dense().double()
            chol = psd_safe_cholesky(k_zz)
            identity = torch.eye(k_zz.shape[0], dtype=torch.float64)
            chol_inv = torch.linalg.solve_triangular(chol, identity, upper=False)  # L^-1
            q_u = strategy.variational_distribution
            mean_weights = chol_inv.T @ q_u.mean.double()
            middle = chol_inv.T @ (q_u.covariance_matrix.double() - identity) @ chol_inv
        return mean_weights, 0.5 * (middle + middle.T)

    # -- observe ----------------------------------------------------------------------------
    def program(self, ids: Tensor, successes: Tensor, trials: Tensor, step: int) -> Program:
        return self.program_and_buffer(ids, successes, trials, step)[0]

    def program_and_buffer(self, ids: Tensor, successes: Tensor, trials: Tensor, step: int) -> tuple[Program, dict]:
        """The buffer with this batch written in, each outcome weighted decay**age (forgetting),
        and the buffer and generator state the update commits."""
        o, ids, step = self.options, self.check_ids(ids), int(step)
        buffer = self._appended(ids, successes, trials, step)
        count = int(buffer["buffer_count"])
        age = (step - buffer["buffer_steps"][:count]).clamp_min(0).to(torch.float32)
        weights = factor(o.decay, age, torch.float32)
        minibatch = o.minibatch_size if o.minibatch_size < count else None
        args = (buffer["buffer_inputs"][:count], buffer["buffer_successes"][:count], buffer["buffer_trials"][:count],
                weights, minibatch)
        generator = torch.Generator()
        generator.set_state(self.state.generator)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))  # subsamples and draws follow this seed
        objective = self.engine.objective
        return Program(objective.model, objective.guide, args, "svi", engine=self.engine, state=self.state.engine,
                       seed=seed), {**buffer, "generator": generator.get_state()}

    def _observe(self, ids: Tensor, successes: Tensor, trials: Tensor, step: int):
        """Add the batch to the buffer and refit; returns {"elbo": [negative ELBO per SVI step]}."""
        program, changes = self.program_and_buffer(ids, successes, trials, step)
        self.gp.train()
        engine, info = self.engine.update(program.state, *program.args, seed=program.seed)
        if "failed" in info:
            self._state_changed()  # the engine put the old parameters back; refresh GPyTorch's caches
            raise RuntimeError(f"gp update failed, state unchanged: {info['failed']}")
        return {**changes, "engine": engine}, {"elbo": info["elbo"]}

    def _appended(self, ids: Tensor, successes: Tensor, trials: Tensor, step: int) -> dict[str, Tensor]:
        """The buffer with this batch written in (new tensors; committed only if the update succeeds)."""
        state, size = self.state, self.options.buffer_size
        n = ids.shape[0]
        if n > size:  # a batch larger than the buffer: keep its last `size` rows
            ids, successes, trials, n = ids[-size:], successes[-size:], trials[-size:], size
        rows = (int(state.buffer_head) + torch.arange(n)) % size
        out = {name: getattr(state, name).index_put((rows,), value) for name, value in (
            ("buffer_ids", ids), ("buffer_successes", successes), ("buffer_trials", trials),
            ("buffer_steps", torch.full((n,), step, dtype=torch.int64)), ("buffer_inputs", self.inputs(ids)))}
        out["buffer_count"] = torch.tensor(min(int(state.buffer_count) + n, size))
        out["buffer_head"] = torch.tensor((int(state.buffer_head) + n) % size)
        return out

    def _fixed_tensors(self) -> TensorDict:
        trained = {name for name, p in self.gp.named_parameters() if p.requires_grad}
        return TensorDict({name: value.detach().clone() for name, value in self.gp.state_dict().items()
                           if name not in trained})

    def _state_changed(self) -> None:
        """The GP computes with the state's tensors; GPyTorch's cached solves and the predictive
        terms are refreshed from them."""
        self.gp.load_state_dict(self.state.fixed, strict=False)
        self.engine.write(self.state.engine)
        self.gp.train()
        self.gp.eval()
        self._predictive = self._predictive_terms()


def _checked_features(pool: PromptPool) -> Tensor:
    features = pool.features
    if features is None:
        raise ValueError("the 'gp' predictor needs prompt embeddings in pool.features "
                         "(e.g. mpts.training.embeddings.cached_embeddings(texts, path)); this pool has none")
    features = torch.as_tensor(features)
    if features.dim() != 2:
        raise ValueError(f"pool.features must be a 2-D [prompts, dims] tensor, got shape {tuple(features.shape)}")
    if not features.is_floating_point():
        features = features.float()
    if not bool(torch.isfinite(features).all()):
        raise ValueError("pool.features contains NaN or infinite values")
    return features


def _median_distance(points: Tensor) -> float:
    """Median pairwise distance: a lengthscale at which the kernel neither saturates nor vanishes."""
    distances = torch.cdist(points.double(), points.double())
    off_diagonal = distances[~torch.eye(points.shape[0], dtype=torch.bool)]
    median = float(off_diagonal.median()) if off_diagonal.numel() else 1.0
    return median if math.isfinite(median) and median > 0 else 1.0
