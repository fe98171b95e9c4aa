"""Streaming assumed-density filtering of a Pyro model's latent sites, on the model as written.

A model declares each latent with its *base* prior (`pyro.sample("x", dist.Normal(m, s))`, or a
`LogNormal`: Normal in the unconstrained space Pyro's autoguides work in). The filter keeps a
Normal posterior per site in that unconstrained space and, at the next update, replaces the base
prior by the posterior-to-prior rule's prior (`TemperedPriors`): the last posterior tempered
toward the base with weight lam**steps_waited (`forgetting.decay_gaussian`, exact for Normals; a
weight of 0 is the base prior itself, as for a prompt never seen). The base's parameters may
depend on other latents (a hierarchical prior); the tempered prior then does too.

`fit_posterior` runs the update: an `AutoNormal` over the latents standardised by those priors,
started at them, and a few SVI steps (`StreamingSVI`), read back as (loc, scale) per site. `TemperedPriors(..., noise=)` also runs the
model at loc + scale * noise for every latent, which is how a predictor takes the first-order
(delta-method) predictive of a quantity the model computes.
"""

from __future__ import annotations

import math
from operator import attrgetter
from typing import Any, Callable, NamedTuple

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoNormal, init_to_mean
from pyro.poutine.messenger import Messenger
from torch import Tensor

from .forgetting import decay_gaussian
from .streaming import StreamingSVI


class Belief(NamedTuple):
    """A latent's last posterior (unconstrained loc and scale) and the weight it keeps now."""

    loc: Tensor
    scale: Tensor
    weight: Tensor  # lam**steps waited, broadcastable against loc; 0: the model's own prior


def normal_base(fn: Any, site: str) -> tuple[Any, int]:
    """(Normal or LogNormal, reinterpreted event dims) of a latent's prior, or a one-line error."""
    event_dim = 0
    while isinstance(fn, dist.Independent):
        event_dim += fn.reinterpreted_batch_ndims
        fn = fn.base_dist
    if not isinstance(fn, (torch.distributions.Normal, torch.distributions.LogNormal)):
        raise ValueError(f"latent site {site!r} has a {type(fn).__name__} prior; a filtered latent must be "
                         f"dist.Normal or dist.LogNormal (Normal in its unconstrained space)")
    return fn, event_dim


def unconstrained(fn: Any) -> tuple[Tensor, Tensor]:
    """loc and scale of a Normal/LogNormal prior in unconstrained space."""
    return fn.loc, fn.scale


def constrained(fn: Any, value: Tensor) -> Tensor:
    return value.exp() if isinstance(fn, torch.distributions.LogNormal) else value


class TemperedPriors(Messenger):
    """Each latent named in `beliefs` gets the prior its posterior-to-prior rule gives.

    With `noise` (name -> tensor of the site's shape), a latent takes the value loc + scale * noise
    of that prior (unconstrained) instead of a draw. With `frame` (name -> (c, d)), a latent x is
    sampled as the standardised site "<name>_standardized", u = (x - c) / d, with x = c + d u as
    the site's value (as Pyro's `LocScaleReparam` does): SVI then moves every latent in units of
    its own prior's spread, so a step of Adam (about lr) means the same for a wide and a sharp belief.
    """

    def __init__(self, beliefs: dict[str, Belief], noise: dict[str, Tensor] | None = None,
                 frame: dict[str, tuple[Tensor, Tensor]] | None = None):
        super().__init__()
        self.beliefs, self.noise, self.frame = beliefs, noise, frame

    def _pyro_sample(self, msg: Any) -> None:
        name = msg["name"]
        if msg["is_observed"] or name not in self.beliefs:
            return
        base, event_dim = normal_base(msg["fn"], name)
        belief = self.beliefs[name]
        shape = base.batch_shape
        if belief.loc.shape != shape:
            raise ValueError(f"latent site {name!r} has shape {tuple(shape)} here but {tuple(belief.loc.shape)} "
                             f"in the filter's state (a site's shape must not depend on the batch)")
        base_loc, base_scale = (x.expand(shape) for x in unconstrained(base))
        loc, scale = decay_gaussian(belief.loc, belief.scale, base_loc, base_scale, belief.weight)
        msg["fn"] = type(base)(loc, scale).to_event(event_dim)
        if self.noise is not None:
            msg["value"] = constrained(base, loc + scale * self.noise[name])
            msg["done"] = True
        elif self.frame is not None:
            c, d = self.frame[name]
            u = pyro.sample(f"{name}{STANDARDIZED}", dist.Normal((loc - c) / d, scale / d).to_event(event_dim))
            value = constrained(base, c + d * u)
            msg["fn"] = dist.Delta(value, event_dim=event_dim).mask(False)  # a deterministic site, as reparam's
            msg["value"], msg["is_observed"] = value, True


STANDARDIZED = "_standardized"


def prior_locations(model: Callable, beliefs: dict[str, Belief], *args) -> dict[str, tuple[Tensor, Tensor]]:
    """(loc, scale) of every latent's tempered prior (unconstrained), with the latents it depends on
    at their own prior's location."""
    zeros = {name: torch.zeros_like(belief.loc) for name, belief in beliefs.items()}
    trace = poutine.trace(TemperedPriors(beliefs, zeros)(model)).get_trace(*args)
    out = {}
    for name in beliefs:
        base, _ = normal_base(trace.nodes[name]["fn"], name)
        out[name] = tuple(x.expand(base.batch_shape).detach() for x in unconstrained(base))
    return out


def fit_posterior(model: Callable, beliefs: dict[str, Belief], *args, steps: int, lr: float, seed: int,
                  num_particles: int = 1, guide_class: type[AutoNormal] = AutoNormal
                  ) -> tuple[dict[str, tuple[Tensor, Tensor]] | None, dict]:
    """`steps` SVI steps of an AutoNormal, started at the tempered priors, on `model` with those
    priors; returns ({site: (loc, scale)} of the Normal posterior in unconstrained space, info),
    or (None, {"failed": reason}). The learning rate falls to lr / 10 over the steps, so the last
    steps settle rather than jitter by about lr."""
    frame = prior_locations(model, beliefs, *args)
    tempered = TemperedPriors(beliefs, frame=frame)(model)
    guide = guide_class(tempered, init_loc_fn=init_to_mean, init_scale=1.0)  # = the prior, standardised
    engine = StreamingSVI(tempered, guide, steps=steps, lr=lr, lr_decay=0.1 ** (1 / steps),
                          loss=Trace_ELBO(num_particles=num_particles))
    engine.prepare(*args, seed=seed)  # the autoguide builds its parameters from the model's sites
    _, info = engine.update(engine.init(), *args, seed=seed)
    if "failed" in info:
        return None, info
    out = {}
    for name, (c, d) in frame.items():
        m, s = (attrgetter(name + STANDARDIZED)(params).detach() for params in (guide.locs, guide.scales))
        out[name] = (c + d * m, d * s)
    return out, info


def laplace_posterior(model: Callable, beliefs: dict[str, Belief], *args, iterations: int = 50
                      ) -> tuple[dict[str, tuple[Tensor, Tensor]] | None, dict]:
    """The mean-field Laplace projection of `model` with the tempered priors: the joint mode of the
    latents (L-BFGS on the standardised latents, started at the priors) and, per coordinate, the
    curvature of the log joint there (the precision mean-field VI would give a Gaussian posterior).
    Deterministic. Returns ({site: (loc, scale)} in unconstrained space, {"elbo": [the Laplace
    approximation of -log p(batch)]}), or (None, {"failed": reason}) when the mode or a curvature is not finite and positive."""
    frame = prior_locations(model, beliefs, *args)
    tempered = TemperedPriors(beliefs, frame=frame)(model)
    u = {name: torch.zeros_like(c, requires_grad=True) for name, (c, _) in frame.items()}

    def negative_log_joint() -> Tensor:
        data = {name + STANDARDIZED: value for name, value in u.items()}
        return -poutine.trace(poutine.condition(tempered, data=data)).get_trace(*args).log_prob_sum()

    optimiser = torch.optim.LBFGS(list(u.values()), lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-7, tolerance_change=1e-10)

    def closure() -> Tensor:
        optimiser.zero_grad(set_to_none=True)
        loss = negative_log_joint()
        loss.backward()
        return loss

    try:
        optimiser.step(closure)
        loss = negative_log_joint()
        gradients = torch.autograd.grad(loss, list(u.values()), create_graph=True)
        precision = {name: torch.zeros_like(value) for name, value in u.items()}
        for name, per_prompt_index in _coordinates(u, beliefs):
            direction = {key: torch.zeros_like(value) for key, value in u.items()}
            per_prompt_index(direction[name]).fill_(1.0)
            curvature = torch.autograd.grad(gradients, list(u.values()),
                                            grad_outputs=list(direction.values()), retain_graph=True)
            row = dict(zip(u, curvature))[name]
            per_prompt_index(precision[name]).copy_(per_prompt_index(row.detach()))
        values = [loss.detach(), *(value.detach() for value in u.values()), *precision.values()]
        if not all(bool(torch.isfinite(v).all()) for v in values) or not all(bool((p > 0).all())
                                                                             for p in precision.values()):
            raise FloatingPointError("the log joint has no finite mode with positive curvature")
    except (ValueError, RuntimeError, FloatingPointError, ArithmeticError) as error:
        return None, {"failed": f"{type(error).__name__}: {error}"}
    out = {name: (c + d * u[name].detach(), d * precision[name].rsqrt()) for name, (c, d) in frame.items()}
    # -log p(batch) under the Laplace approximation (what a negative ELBO bounds), for the "elbo" trace
    log_det = sum(float((p / (2 * math.pi)).log().sum()) for p in precision.values())
    return out, {"elbo": [float(loss.detach()) + 0.5 * log_det]}


def _coordinates(u: dict[str, Tensor], beliefs: dict[str, Belief]):
    """(site, selector) per curvature to take: a shared site's every element; for a per-prompt site
    (its weight has the prompts' dim) one event coordinate across all prompts at once, which is
    exact because prompts share no factor with one another given the shared latents."""
    for name, value in u.items():
        if beliefs[name].weight.dim() > 0:  # per prompt: [n, 1, ...]; shared: a scalar
            for index in range(value[0].numel()):
                yield name, (lambda t, i=index: t.view(t.shape[0], -1)[:, i])
        else:
            for index in range(value.numel()):
                yield name, (lambda t, i=index: t.view(-1)[i])


def laplace_linear_gaussian(prior_loc: Tensor, prior_scale_tril: Tensor, design: Tensor, offset: Tensor,
                            log_likelihood: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]],
                            iterations: int = 50, tolerance: float = 1e-8
                            ) -> tuple[tuple[Tensor, Tensor] | None, dict]:
    """The Laplace projection of a multivariate Normal latent u ~ N(prior_loc, prior_scale_tril
    prior_scale_tril^T) seen through a linear map, f = offset + design @ u, by outcomes that each
    depend on one f_j (log-concave in it): Newton's method on the log joint to its mode, with the
    exact Hessian prior precision + design^T diag(-d2) design, in float64.

    `log_likelihood(f)` returns (log p(s_j | f_j), its first and second derivative in f_j) per
    outcome. Returns ((posterior loc, its covariance's lower Cholesky factor), {"elbo": [the Laplace
    approximation of -log p(batch)]}), or (None, {"failed": reason}) when no finite mode is found.
    """
    loc0, chol0 = prior_loc.double(), prior_scale_tril.double()
    design, offset = design.double(), offset.double()
    try:
        precision0 = torch.cholesky_inverse(chol0)

        def log_joint(u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            value, d1, d2 = log_likelihood(offset + design @ u)
            gap = u - loc0
            return value.sum() - 0.5 * gap @ (precision0 @ gap), d1, d2

        u = loc0.clone()
        current, d1, d2 = log_joint(u)
        for _ in range(iterations):
            hessian = precision0 + design.T @ (-d2.unsqueeze(-1) * design)
            gradient = design.T @ d1 - precision0 @ (u - loc0)
            move = torch.cholesky_solve(gradient.unsqueeze(-1), torch.linalg.cholesky(hessian)).squeeze(-1)
            for _ in range(30):  # halve the step until the log joint rises (it is concave: it will)
                proposal, (value, p1, p2) = u + move, log_joint(u + move)
                if bool(value >= current - 1e-12 * abs(float(current))):
                    break
                move = move / 2
            u, current, d1, d2 = proposal, value, p1, p2
            if float(move.abs().max()) < tolerance:
                break
        chol_h = torch.linalg.cholesky(precision0 + design.T @ (-d2.unsqueeze(-1) * design))
        covariance = torch.cholesky_inverse(chol_h)
        scale_tril = torch.linalg.cholesky(0.5 * (covariance + covariance.T))
        if not (bool(torch.isfinite(u).all()) and bool(torch.isfinite(scale_tril).all()) and math.isfinite(current)):
            raise FloatingPointError("the log joint has no finite mode")
    except (RuntimeError, FloatingPointError, ArithmeticError) as error:  # torch.linalg errors are RuntimeErrors
        return None, {"failed": f"{type(error).__name__}: {error}"}
    # log p(batch) ~ log joint at the mode + log|S_post|/2 - log|S_prior|/2 (the Gaussian integral)
    log_evidence = (float(current) + float(scale_tril.diagonal().log().sum()) - float(chol0.diagonal().log().sum()))
    return (u, scale_tril), {"elbo": [-log_evidence]}
