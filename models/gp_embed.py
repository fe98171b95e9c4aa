"""Sparse GP over prompt embeddings, filtered step by step: predicts prompts it has never rolled out.

Generative model (whitened inducing values, logit link; the logit drifts at the forgetting rate):

    u_0 ~ Normal(0, I_M)                                      inducing values at Z (M prompts)
    u_t = sqrt(lam) u_{t-1} + sqrt(1 - lam) w_t,  w_t ~ N(0, I_M)     the drift, per step
    f_t(x) = m + K_xZ K_ZZ^{-1/2} u_t (+ what Z misses)       smooth logit over the embedding at step t
    e_j ~ Normal(0, sigma^2)                                   what the embedding does not explain
    s_j ~ Binomial(k_j, sigmoid(f_{t_j}(x_j) + e_j))           outcome j, seen at step t_j

Forgetting (`decay` = lam) is this drift: f_t - m keeps the GP prior N(0, K) at every step and
corr(f_t(x), f_s(x)) = lam**(abs(t - s) / 2). With whitened u it is exactly an AR(1) whose stationary
law is u's prior, so the posterior moves forward in closed form: d steps later q(u) = N(mu, S)
becomes N(lam**(d/2) mu, lam**d S + (1 - lam**d) I). `predict(ids, step)` applies it for the step
asked about; an update starts from q(u) aged to its step as the prior and folds in that step's
outcomes only (assumed-density filtering: Bayes' rule for the batch, projected back to a Gaussian
by Laplace's method: Newton's method to the mode with the exact Hessian, `inference.adf.laplace_linear_gaussian`;
the likelihood is log-concave in f). Nothing but q(u) carries the past, so old outcomes count
once, through the drift. lam = 1: a fixed logit, and filtering is plain sequential Bayes.

The residual e: prompts that sit close together in embedding space can still differ a lot in
difficulty (on the simulator's features a linear fit on features and true cluster leaves a
logit residual of sd ~1.3-1.5). Without it the model explains every outcome by the smooth f,
whose posterior is rightly sure of the *local average*, so its intervals for one prompt's p
were ~6x too narrow (90% predictive intervals covered ~0.55). e is integrated out in the
likelihood (`BinomialLogitNormal`, an over-dispersed Binomial), together with the part of f the
inducing points miss (its Nystrom residual variance, independent per outcome as in FITC); the
predictive for a prompt is LogitNormal(mean_f, var_f + sigma^2). Each visit gets its own e (a
prompt's earlier outcomes inform it only through f), which keeps the model stateless per prompt;
`residual_scale_init=0` drops the term.

Hyperparameters (kernel lengthscale and output scale, constant mean, sigma; inducing locations if
asked) are point estimates, fitted unless `learn_hyperparameters=False` by `svi_steps` Adam steps
per update on the shared engine (`inference.streaming.StreamingSVI`: warm start, clipped Adam,
rollback on failure) before the batch is folded in. Their objective is the batch's log predictive
under the prior the update starts from, sum_j log BinomialLogitNormal(s_j | k_j, mean_j, var_j +
sigma^2) (each outcome's marginal, exact; their correlation through u left out): the prequential
score of the prediction made just before the batch, the empirical-Bayes choice that makes the
model's stated spread match its errors. It is a Pyro program with no latent site
(`hyperparameter_model`), so its negative ELBO is exactly that negative log predictive.

`program()` declares the batch's model with the fitted hyperparameters (`batch_model`: u from the
aged prior, the outcomes through the linear map) and an `AutoMultivariateNormal` guide;
`tests/test_programs.py` checks the Laplace update against SVI on it.

Inputs: the pool's feature rows, centred and projected onto their top `pca_dim` principal
components (fitted once on a sample of the pool). This keeps kernel evaluations cheap and puts
a stationary kernel on the directions where the prompts actually differ. Inducing points are a
seeded random subset of the pool's prompts (fixed by default: the pool is known in advance).
GPyTorch supplies the kernel, mean and inducing points (`LogitGP`); its variational distribution
mirrors q(u) so that GPyTorch's own predictive can be checked against `latent`. Prompts never
rolled out get the GP's prediction at their embedding, reverting to the fitted mean far from any
observed prompt.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import pyro
import pyro.distributions as dist
import torch
from pydantic import Field
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal, init_to_mean
from torch import Tensor

from mpts.inference.adf import laplace_linear_gaussian
from mpts.inference.forgetting import factor
from mpts.inference.streaming import StreamingSVI, SVIState, WithModule

from .base import PredictorOptions, Program, PromptPool, RiskPredictor, TensorDict
from .distributions import BinomialLogitNormal, binomial_logit_normal
from .extras import import_extra
from .posteriors import LogitNormalPosterior

gpytorch = import_extra("gpytorch", "gp")
psd_safe_cholesky = import_extra("linear_operator.utils.cholesky", "gp").psd_safe_cholesky

_PCA_SAMPLE = 20_000  # rows of the pool used to fit the projection
_PREDICT_CHUNK = 8192  # candidates per GP evaluation, bounds memory for huge candidate sets
_MODULE_NAME = "gp"
_VARIATIONAL = "variational_strategy._variational_distribution."  # GPyTorch's copy of q(u), not state


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
    learn_hyperparameters: bool = Field(True, description=(
        "fit kernel, mean and sigma to each batch's log predictive; False: keep their initial values"))
    pca_dim: int | None = Field(64, ge=1, description="project features on this many principal components; None: raw")
    svi_steps: int = Field(4, ge=1, description="Adam steps on the hyperparameters per observe() call (warm-started)")
    lr: float = Field(0.1, gt=0.0, le=1.0, description="Adam step size (ClippedAdam, as the engine sets it up), (0, 1]")
    decay: float = Field(0.9, gt=0.0, le=1.0, description=(
        "lam: per step the logit keeps a share lam of its variance about the mean and gains (1 - lam) of a fresh "
        "GP draw's (u_t = sqrt(lam) u_{t-1} + sqrt(1 - lam) w_t); 1: a fixed logit"))
    newton_iterations: int = Field(50, ge=1, le=10_000, description="most Newton steps to the batch posterior's mode")
    seed: int | None = Field(None, description="overrides the run seed for this predictor's randomness")


class LogitGP(gpytorch.models.ApproximateGP):
    """The latent logit f: constant mean, scaled stationary kernel, whitened inducing values."""

    def __init__(self, inducing_points: Tensor, kernel: str, lengthscale: float, outputscale: float,
                 residual_scale: float, ard: bool, learn_inducing_locations: bool, learn_hyperparameters: bool):
        variational = gpytorch.variational.CholeskyVariationalDistribution(inducing_points.shape[0])
        strategy = gpytorch.variational.VariationalStrategy(
            self, inducing_points, variational, learn_inducing_locations=learn_inducing_locations)
        super().__init__(strategy)
        variational.requires_grad_(False)  # q(u) is set by the filter, not by gradients
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
        if not learn_hyperparameters:  # frozen: only inducing locations (if asked) are fitted
            for module in (self.mean_module, self.covar_module):
                module.requires_grad_(False)

    @property
    def residual_scale(self) -> Tensor | None:
        """sigma, the sd of a prompt's logit around f; None without the residual term."""
        return torch.nn.functional.softplus(self.raw_residual_scale) if self.has_residual else None

    def forward(self, x: Tensor) -> gpytorch.distributions.MultivariateNormal:
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def linear_map(gp: LogitGP, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(offset [n], design [n, M], noise variance [n]) with f(x) = offset + design @ u + (what Z
    misses): offset m(x), design K_xZ L^-T (L L^T = K_ZZ + jitter), and the noise variance of an
    outcome's logit around offset + design @ u: what Z misses, k(x, x) + jitter - (design row)^2 summed, plus
    sigma^2. Differentiable in the hyperparameters."""
    strategy = gp.variational_strategy
    inducing, jitter = strategy.inducing_points, strategy.jitter_val
    chol = psd_safe_cholesky(gp.covar_module(inducing).add_jitter(jitter).to_dense())
    cross = gp.covar_module(x, inducing).to_dense()  # K_xZ
    design = torch.linalg.solve_triangular(chol, cross.T, upper=False).T
    missed = (gp.covar_module(x, diag=True) + jitter - design.square().sum(-1)).clamp_min(0.0)
    sigma = gp.residual_scale
    noise = missed if sigma is None else missed + sigma.square()
    return gp.mean_module(x), design, noise


def hyperparameter_model(gp: LogitGP, x: Tensor, successes: Tensor, trials: Tensor, prior_loc: Tensor,
                         prior_scale_tril: Tensor) -> None:
    """The batch's outcomes under the prior the update starts from, u integrated out per outcome:
    s_j ~ BinomialLogitNormal(k_j, offset_j + design_j . mu, design_j S design_j^T + noise_j)."""
    offset, design, noise = linear_map(gp, x)
    loc = offset + design @ prior_loc
    variance = (design @ prior_scale_tril).square().sum(-1) + noise
    with pyro.plate("observations", x.shape[0], dim=-1):
        pyro.sample(f"{_MODULE_NAME}.s", BinomialLogitNormal(trials, loc, variance.clamp_min(1e-10).sqrt(),
                                                             validate_args=False), obs=successes)


def no_latents(gp: LogitGP, *args) -> None:
    """The hyperparameter program's guide: it has no latent site (its negative ELBO is -log p(s))."""


def batch_model(prior_loc: Tensor, prior_scale_tril: Tensor, offset: Tensor, design: Tensor, noise: Tensor,
                successes: Tensor, trials: Tensor) -> None:
    """One update's program: u from the aged posterior (the drift's prior at this step), each
    outcome through f = offset + design @ u and its noise (sigma^2 and what Z misses) integrated out."""
    u = pyro.sample(f"{_MODULE_NAME}.u", dist.MultivariateNormal(prior_loc, scale_tril=prior_scale_tril))
    with pyro.plate("observations", offset.shape[0], dim=-1):
        f = offset + (design * u).sum(-1)  # u's batch dims (vectorised particles) end in this plate's dim
        pyro.sample(f"{_MODULE_NAME}.s", BinomialLogitNormal(trials, f, noise.sqrt(),
                                                             validate_args=False), obs=successes)


def outcome_log_likelihood(successes: Tensor, trials: Tensor, noise: Tensor):
    """f -> (log p(s_j | f_j), d/df, d2/df2) with the noise N(0, noise_j) integrated out: the
    derivatives from the exact posterior moments of g = f + noise given s (Gaussian identities:
    d log p/df = (E[g|s] - f) / v, d2 = (Var[g|s] - v) / v^2)."""
    noise = noise.double()
    scale = noise.sqrt()

    def log_likelihood(f: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        value, mean, variance = binomial_logit_normal(f, scale, successes, trials, moments=True)
        return value, (mean - f) / noise, (variance - noise) / noise.square()

    return log_likelihood


def aged(loc: Tensor, scale_tril: Tensor, retained: float) -> tuple[Tensor, Tensor]:
    """q(u) moved on by the drift: N(sqrt(r) mu, r S + (1 - r) I), r = lam**steps (float64)."""
    if retained == 1.0:
        return loc, scale_tril
    covariance = retained * scale_tril @ scale_tril.T + (1 - retained) * torch.eye(loc.shape[0], dtype=loc.dtype)
    return math.sqrt(retained) * loc, torch.linalg.cholesky(covariance)


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
    engine: SVIState  # kernel, mean and residual parameters (and inducing locations if learned) with Adam moments
    fixed: TensorDict  # the GP's other tensors: inducing points, frozen hyperparameters, flags
    u_loc: Tensor  # float64 [M]: mean of q(u), the whitened inducing values at step `fit_step`
    u_scale_tril: Tensor  # float64 [M, M]: lower Cholesky factor of q(u)'s covariance
    fit_step: Tensor  # int64 scalar: the step q(u) describes (the latest update's)


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
            with torch.no_grad():  # initialise GPyTorch's q(u) now, so every tensor exists from the start
                self.gp.train()
                self.gp(inducing_points[:1])

        self.engine = StreamingSVI(WithModule(hyperparameter_model, self.gp), WithModule(no_latents, self.gp),
                                   steps=o.svi_steps, lr=o.lr, loss=Trace_ELBO(max_plate_nesting=1))
        self.state = GPState(
            engine=self.engine.init(), fixed=self._fixed_tensors(),
            u_loc=torch.zeros(num_inducing, dtype=torch.float64),
            u_scale_tril=torch.eye(num_inducing, dtype=torch.float64), fit_step=torch.tensor(0))
        self._state_changed()

    # -- inputs -----------------------------------------------------------------------------
    def inputs(self, ids: Tensor) -> Tensor:
        """GP inputs of these prompts: centred, projected features (float32 [n, q])."""
        return self.features[ids].float() @ self.projection - self.feature_mean @ self.projection

    # -- predict ----------------------------------------------------------------------------
    def _predict(self, ids: Tensor, step: int) -> LogitNormalPosterior:
        """p = sigmoid(f_step + e): the GP's posterior of f aged to `step`, plus the residual's variance."""
        loc, scale = self.latent(ids, step)
        sigma = self.gp.residual_scale
        if sigma is not None:
            scale = (scale.square() + float(sigma.detach()) ** 2).sqrt()
        return LogitNormalPosterior(loc=loc, scale=scale)

    def retained(self, step: int | None) -> float:
        """lam**(steps from the latest update to `step`): the share of q(u)'s information the drift leaves."""
        wait = 0 if step is None else max(int(step) - int(self.state.fit_step), 0)
        return float(factor(self.options.decay, wait))

    def latent(self, ids: Tensor, step: int | None = None) -> tuple[Tensor, Tensor]:
        """Posterior mean and standard deviation of the smooth logit f (no residual) for these prompts
        at `step` (None: the step of the latest update; later steps add the drift's variance).

        Same numbers as GPyTorch's eval-mode `gp(x)` at the latest update's step (a test checks),
        with everything that does not depend on x folded once per update into `self._predictive`
        (float64): mean = m(x) + K_xZ L^-T mu and var = k(x, x) + K_xZ L^-T (S - I) L^-1 K_Zx, so a
        batch of candidates costs one [n, M] x [M, M] product instead of a triangular solve and two
        products. Aged by r = lam**wait: mu -> sqrt(r) mu and S - I -> r (S - I).
        """
        mean_weights, middle = self._predictive
        retained = self.retained(step)
        gp, inducing = self.gp, self.gp.variational_strategy.inducing_points
        jitter = self.gp.variational_strategy.jitter_val
        locs, scales = [], []
        with torch.no_grad():
            for chunk in ids.split(_PREDICT_CHUNK):
                x = self.inputs(chunk)
                cross = gp.covar_module(x, inducing).to_dense().double()  # K_xZ [n, M]
                loc = gp.mean_module(x).double() + math.sqrt(retained) * (cross @ mean_weights)
                prior_var = gp.covar_module(x, diag=True).double() + jitter
                var = prior_var + retained * ((cross @ middle) * cross).sum(-1)
                locs.append(loc.float())
                scales.append(var.clamp_min(1e-10).sqrt().float())
        return torch.cat(locs), torch.cat(scales)

    def _predictive_terms(self) -> tuple[Tensor, Tensor]:
        """(L^-T mu, L^-T (S - I) L^-1) in float64, from the kernel and q(u) in the state."""
        strategy = self.gp.variational_strategy
        with torch.no_grad():
            inducing = strategy.inducing_points
            k_zz = self.gp.covar_module(inducing).add_jitter(strategy.jitter_val).to_dense().double()
            chol = psd_safe_cholesky(k_zz)
            identity = torch.eye(k_zz.shape[0], dtype=torch.float64)
            chol_inv = torch.linalg.solve_triangular(chol, identity, upper=False)  # L^-1
            scale_tril = self.state.u_scale_tril
            mean_weights = chol_inv.T @ self.state.u_loc
            middle = chol_inv.T @ (scale_tril @ scale_tril.T - identity) @ chol_inv
        return mean_weights, 0.5 * (middle + middle.T)

    # -- observe ----------------------------------------------------------------------------
    def program(self, ids: Tensor, successes: Tensor, trials: Tensor, step: int) -> Program:
        """The batch's model with the hyperparameters this update fits, an AutoMultivariateNormal
        guide over u, and `posterior(guide)`: the batch's predictive at the next step from a fitted guide."""
        ids = self.check_ids(ids)
        args, _, _ = self._batch(ids, successes, trials, int(step))
        guide = AutoMultivariateNormal(batch_model, init_loc_fn=init_to_mean)
        StreamingSVI(batch_model, guide, steps=1).prepare(*args, seed=self.seed)  # the autoguide builds its parameters

        def posterior(fitted: AutoMultivariateNormal) -> LogitNormalPosterior:
            q_u = fitted.get_posterior()
            loc, scale_tril = aged(q_u.loc.detach().double(), q_u.scale_tril.detach().double(),
                                   float(factor(self.options.decay, 1)))
            offset, design, noise = (a.double() for a in args[2:5])
            return LogitNormalPosterior(loc=(offset + design @ loc).float(),
                                        scale=((design @ scale_tril).square().sum(-1) + noise).sqrt().float())

        return Program(batch_model, guide, args, "laplace", posterior)

    def _batch(self, ids: Tensor, successes: Tensor, trials: Tensor, step: int) -> tuple[tuple, SVIState, list]:
        """(batch_model's arguments, the engine state with the hyperparameters fitted to this batch,
        the fit's losses). Leaves the GP module holding the state's parameters."""
        prior = aged(self.state.u_loc, self.state.u_scale_tril, self.retained(step))
        x = self.inputs(ids)
        engine, losses = self.state.engine, []
        if self.engine.named_parameters():
            engine, info = self.engine.update(self.state.engine, x, successes, trials,
                                              prior[0].float(), prior[1].float(), seed=self.seed)
            if "failed" in info:
                raise RuntimeError(f"gp hyperparameter update failed, state unchanged: {info['failed']}")
            losses = info["elbo"]
        try:
            with torch.no_grad():
                self.engine.write(engine)
                terms = tuple(t.double() for t in linear_map(self.gp, x))  # copies, before the write below
        finally:
            self.engine.write(self.state.engine)
        terms = (*terms, successes.double(), trials.double())
        return (*prior, *terms), engine, losses

    def _observe(self, ids: Tensor, successes: Tensor, trials: Tensor, step: int):
        """Fit the hyperparameters to the batch, then condition q(u), aged to this step, on it
        (Laplace); returns {"elbo": [the batch's negative log predictive per hyperparameter step,
        then the Laplace approximation of its negative log evidence]}."""
        args, engine, losses = self._batch(ids, successes, trials, step)
        prior_loc, prior_scale_tril, offset, design, noise = args[:5]
        posterior, info = laplace_linear_gaussian(
            prior_loc, prior_scale_tril, design, offset, outcome_log_likelihood(successes, trials, noise),
            iterations=self.options.newton_iterations)
        if posterior is None:
            raise RuntimeError(f"gp update failed, state unchanged: {info['failed']}")
        return ({"engine": engine, "u_loc": posterior[0], "u_scale_tril": posterior[1],
                 "fit_step": torch.tensor(max(step, int(self.state.fit_step)))}, {"elbo": losses + info["elbo"]})

    def _fixed_tensors(self) -> TensorDict:
        trained = {name for name, p in self.gp.named_parameters() if p.requires_grad}
        return TensorDict({name: value.detach().clone() for name, value in self.gp.state_dict().items()
                           if name not in trained and not name.startswith(_VARIATIONAL)})

    def _state_changed(self) -> None:
        """The GP computes with the state's tensors; GPyTorch's q(u) and cached solves and the
        predictive terms are refreshed from them."""
        q_u = {_VARIATIONAL + "variational_mean": self.state.u_loc.float(),
               _VARIATIONAL + "chol_variational_covar": self.state.u_scale_tril.float()}
        self.gp.load_state_dict({**self.state.fixed, **q_u}, strict=False)
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
