"""Streaming assumed-density filtering of a Pyro model's latent sites, on the model as written.

A model declares each latent with its *base* prior (`pyro.sample("x", dist.Normal(m, s))`, or a
`LogNormal`: Normal in the unconstrained space Pyro's autoguides work in). The filter keeps a
Normal posterior per site in that unconstrained space and, at the next update, replaces the base
prior by the posterior-to-prior rule's prior (`TemperedPriors`): the last posterior tempered
toward the base with weight lam**steps_waited (`forgetting.decay_gaussian`, exact for Normals; a
weight of 0 is the base prior itself, as for a prompt never seen). The base's parameters may
depend on other latents (a hierarchical prior); the tempered prior then does too.

`fit_posterior` runs the update: an `AutoNormal` started at those priors and a few SVI steps
(`StreamingSVI`), read back as (loc, scale) per site. `TemperedPriors(..., noise=)` also runs the
model at loc + scale * noise for every latent, which is how a predictor takes the first-order
(delta-method) predictive of a quantity the model computes.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Any, Callable, NamedTuple

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.infer.autoguide.utils import deep_setattr
from pyro.nn import PyroParam
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

    With `noise` (name -> tensor of the site's shape), a latent also takes the value
    loc + scale * noise of that prior (unconstrained), instead of a draw.
    """

    def __init__(self, beliefs: dict[str, Belief], noise: dict[str, Tensor] | None = None):
        super().__init__()
        self.beliefs, self.noise = beliefs, noise

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


def init_to_prior_loc(site: dict) -> Tensor:
    """AutoNormal's start: every latent at its prior's location (unconstrained loc mapped back)."""
    base, _ = normal_base(site["fn"], site["name"])
    return constrained(base, unconstrained(base)[0]).detach()


def fit_posterior(model: Callable, *args, steps: int, lr: float, seed: int, num_particles: int = 1,
                  guide_class: type[AutoNormal] = AutoNormal) -> tuple[dict[str, tuple[Tensor, Tensor]] | None, dict]:
    """`steps` SVI steps of an AutoNormal started at `model`'s priors; returns ({site: (loc, scale)}
    of the Normal posterior in unconstrained space}, info), or (None, {"failed": reason})."""
    guide = guide_class(model, init_loc_fn=init_to_prior_loc)
    engine = StreamingSVI(model, guide, steps=steps, lr=lr, loss=Trace_ELBO(num_particles=num_particles))
    engine.prepare(*args, seed=seed)  # the autoguide builds its parameters from the model's sites
    for name, site in guide.prototype_trace.iter_stochastic_nodes():  # start each scale at the prior's
        base, _ = normal_base(site["fn"], name)
        scale = unconstrained(base)[1].expand(base.batch_shape).detach().clone()
        deep_setattr(guide.scales, name, PyroParam(scale, constraints.softplus_positive, site["fn"].event_dim))
    _, info = engine.update(engine.init(), *args, seed=seed)
    if "failed" in info:
        return None, info
    return {name: (attrgetter(name)(guide.locs).detach().clone(), attrgetter(name)(guide.scales).detach().clone())
            for name, _ in guide.prototype_trace.iter_stochastic_nodes()}, info
