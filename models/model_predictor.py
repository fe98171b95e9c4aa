"""A predictor that is its Pyro model: the user writes `model(batch)`, the library does the rest.

    class SkillDifficulty(ModelPredictor):
        name = "skill_difficulty"

        def model(self, batch):
            with pyro.plate("clusters", batch.num_clusters):
                skill = pyro.sample("skill", dist.Normal(0.0, 2.0))
            with batch.prompts:
                difficulty = pyro.sample("difficulty", dist.Normal(0.0, 2.0))
                batch.observe(skill[batch.clusters] - difficulty)  # the logit of p

`model` declares every latent with its base prior (Normal or LogNormal) and hands the logit of the
batch's success probability to `batch.observe`, which adds S ~ Binomial(k, logit) when outcomes
are given. Latents inside `batch.prompts` are each prompt's own (state [N]); the others are shared.

The library owns the rest (`inference.adf`), in the spirit of Pyro's `contrib.forecast`:

- **posterior to prior**: each latent's prior at an update is its last posterior (a Normal in
  unconstrained space), tempered toward the base prior with lam**steps waited (`decay`, per kind
  "prompts"/"shared" or per site name); a prompt never seen gets the base prior. Prompts are
  brought up to date lazily, when next predicted or observed, so a step never sweeps the pool.
- **update**: streaming SVI with an `AutoNormal` started at those priors (`svi_steps`, `lr`),
  seeded from the predictor's seed and its update count; a non-finite update raises
  `FloatingPointError` and changes nothing.
- **prediction**: the logit's first-order (delta-method) predictive under the same priors the next
  update starts from, as a `LogitNormalPosterior` (exact when the logit is linear in the latents).
- **state**: the posterior of every latent as tensors; saving and loading are `RiskPredictor`'s.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import pyro
import pyro.distributions as dist
import torch
import torch.autograd.forward_ad as fwAD
from pydantic import Field, field_validator
from pyro import poutine
from pyro.infer.autoguide import AutoNormal
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor

from mpts.inference.adf import Belief, TemperedPriors, fit_posterior, laplace_posterior, normal_base
from mpts.inference.forgetting import factor

from .base import PredictorOptions, PromptPool, RiskPredictor, Rows
from .posteriors import LogitNormalPosterior

PROMPTS = "prompts"  # the plate of the batch's prompts
KINDS = {"prompts": 0.99, "shared": 0.9}  # default lam per step waited, by kind of latent


class ModelOptions(PredictorOptions):
    decay: float | dict[str, float] = Field(
        dict(KINDS), description="lam per step waited, toward the model's prior: one number, or a mapping from "
                                 "'prompts' / 'shared' (each prompt's latents / the others) or a site name to lam")
    update: Literal["laplace", "svi"] = Field(
        "laplace", description="how each batch's posterior is projected back to a Normal per latent: 'laplace' "
                               "(the joint mode and the curvature there; deterministic) or 'svi' (an AutoNormal "
                               "fitted by streaming SVI: svi_steps, lr, num_particles)")
    iterations: int = Field(50, ge=1, le=10_000, description="laplace: L-BFGS iterations to the mode")
    svi_steps: int = Field(20, ge=1, le=10_000, description="svi: steps per observed batch")
    lr: float = Field(0.2, gt=0.0, le=1.0, description="svi: Adam learning rate (falling to lr/10 over the steps)")
    num_particles: int = Field(4, ge=1, le=256, description="svi: ELBO particles per step")
    seed: int | None = Field(None, ge=0, description="svi: seeds the draws; None: the run seed")

    @field_validator("decay")
    @classmethod
    def _rates_in_range(cls, value):
        rates = value.values() if isinstance(value, dict) else [value]
        if any(not 0.0 <= rate <= 1.0 for rate in rates):
            raise ValueError(f"decay must be in [0, 1], got {value}")
        return value


class Batch:
    """One batch of prompts as the model sees it (outcomes absent when predicting)."""

    def __init__(self, ids: Tensor, successes: Tensor | None, trials: Tensor | None, clusters: Tensor,
                 features: Tensor | None, num_clusters: int):
        self.ids, self.successes, self.trials = ids, successes, trials
        self.clusters, self.features, self.num_clusters = clusters, features, num_clusters
        self.logit: Tensor | None = None

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def prompts(self) -> pyro.plate:
        """The plate of the batch's prompts: latents sampled inside it are per prompt."""
        return pyro.plate(PROMPTS, len(self))

    def observe(self, logit: Tensor) -> None:
        """Declare the logit of each prompt's success probability (and condition on the outcomes)."""
        self.logit = logit
        if self.successes is not None:
            pyro.sample("successes", LogitBinomial(self.trials, logits=logit), obs=self.successes)


class LogitBinomial(dist.Binomial):
    """Binomial whose log_prob is s log sigmoid(x) + (k - s) log sigmoid(-x) + log C(k, s): the same
    values as torch's, but with derivatives of every order right at x = 0, where torch's stable form
    (through abs(x) and a clamp) gives a wrong gradient and no curvature (the Laplace update needs both)."""

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        k, x = self.total_count, self.logits
        return (torch.lgamma(k + 1) - torch.lgamma(value + 1) - torch.lgamma(k - value + 1)
                + value * torch.nn.functional.logsigmoid(x) + (k - value) * torch.nn.functional.logsigmoid(-x))


@dataclasses.dataclass(frozen=True)
class Site:
    name: str
    per_prompt: bool
    shape: tuple[int, ...]  # per prompt (event shape) or the whole shared site
    start: int  # its columns in prompt_loc / entries in shared_loc
    stop: int


@dataclasses.dataclass(frozen=True)
class ModelState:
    prompt_loc: Tensor  # float32 [N, D]: every prompt's latents' posterior locations (unconstrained), side by side
    prompt_scale: Tensor
    prompt_step: Tensor  # int64 [N]: step of each prompt's last update; -1: never (its prior is the model's)
    shared_loc: Tensor  # float32 [G]: the shared latents' posterior, flattened
    shared_scale: Tensor
    shared_step: Tensor  # int64 scalar; -1 before the first update
    num_updates: Tensor  # int64 scalar: seeds each update's SVI draws


class ModelPredictor(RiskPredictor):
    """Subclass, set `name` and write `model(self, batch)`; see the module docstring."""

    Options = ModelOptions
    Guide: type[AutoNormal] = AutoNormal  # update "svi": the guide (an AutoNormal, or a subclass of it)

    def model(self, batch: Batch) -> None:
        raise NotImplementedError(f"{type(self).__name__} must define model(self, batch)")

    def __init__(self, pool: PromptPool, options: ModelOptions | None = None, seed: int = 0):
        super().__init__(pool, options, seed)
        self.seed_used = self.options.seed if self.options.seed is not None else seed
        self.num_clusters = int(pool.clusters.max()) + 1 if pool.has_clusters else 1
        self.sites = self._discover_sites()
        self.rates = self._rates()
        width = max((s.stop for s in self.sites if s.per_prompt), default=0)
        size = max((s.stop for s in self.sites if not s.per_prompt), default=0)
        n = self.num_prompts
        self.state = ModelState(torch.zeros(n, width), torch.ones(n, width), torch.full((n,), -1, dtype=torch.int64),
                                torch.zeros(size), torch.ones(size), torch.tensor(-1), torch.tensor(0))

    # -- what the model declares ---------------------------------------------------------------------
    def _batch(self, ids: Tensor, successes: Tensor | None = None, trials: Tensor | None = None) -> Batch:
        clusters = self.pool.clusters[ids].long() if self.pool.has_clusters else torch.zeros_like(ids)
        features = self.pool.features[ids].float() if self.pool.has_features else None
        return Batch(ids, successes, trials, clusters, features, self.num_clusters)

    def _discover_sites(self) -> list[Site]:
        """The model's latents, traced once on a batch of two prompts (CPU, seeded, no state)."""
        n = min(2, self.num_prompts)
        ids = torch.arange(n, device="cpu")
        features = (torch.zeros(n, self.pool.feature_dim, device="cpu") if self.pool.has_features else None)
        batch = Batch(ids, torch.zeros(n, device="cpu"), torch.ones(n, device="cpu"),
                      torch.zeros(n, dtype=torch.long, device="cpu"), features, self.num_clusters)
        with torch.random.fork_rng(devices=[]), torch.device("cpu"):
            torch.manual_seed(0)
            trace = prune_subsample_sites(poutine.trace(self.model).get_trace(batch))
        if batch.logit is None or batch.logit.shape != (n,):
            raise ValueError(f"{self.name}: model must call batch.observe(logit) with one logit per prompt")
        sites, width, size = [], 0, 0
        for name, site in trace.iter_stochastic_nodes():
            base, event_dim = normal_base(site["fn"], name)
            per_prompt = any(frame.name == PROMPTS for frame in site["cond_indep_stack"])
            shape = tuple(base.batch_shape)
            if per_prompt:
                if len(shape) != 1 + event_dim or shape[0] != n:
                    raise ValueError(f"{self.name}: latent {name!r} in batch.prompts has shape {shape}; a per-prompt "
                                     f"latent is [prompts] or [prompts, ...] with .to_event() for the rest")
                sites.append(Site(name, True, shape[1:], width, width + _numel(shape[1:])))
                width = sites[-1].stop
            else:
                sites.append(Site(name, False, shape, size, size + _numel(shape)))
                size = sites[-1].stop
        return sites

    def _rates(self) -> dict[str, float]:
        value = self.options.decay
        given = {kind: float(value) for kind in KINDS} if not isinstance(value, dict) else dict(value)
        unknown = sorted(set(given) - set(KINDS) - {s.name for s in self.sites})
        if unknown:
            raise ValueError(f"decay: unknown part {unknown[0]!r}; parts are 'prompts', 'shared' and the model's "
                             f"latents {', '.join(s.name for s in self.sites) or '(none)'}")
        kinds = {**KINDS, **{k: v for k, v in given.items() if k in KINDS}}
        return {s.name: given.get(s.name, kinds["prompts" if s.per_prompt else "shared"]) for s in self.sites}

    # -- the posterior-to-prior rule -----------------------------------------------------------------
    def beliefs(self, ids: Tensor, step: int) -> dict[str, Belief]:
        """Each latent's last posterior and the weight it keeps at `step` (0 where never updated)."""
        state, n = self.state, ids.shape[0]
        waited = (step - state.prompt_step[ids]).clamp_min(0)
        seen = state.prompt_step[ids] >= 0
        shared_waited = max(step - int(state.shared_step), 0)
        out = {}
        for s in self.sites:
            if s.per_prompt:
                weight = torch.where(seen, factor(self.rates[s.name], waited, torch.float32), 0.0)
                loc, scale = (x[ids, s.start:s.stop].reshape((n,) + s.shape) for x in (state.prompt_loc,
                                                                                          state.prompt_scale))
                weight = weight.reshape((n,) + (1,) * len(s.shape))
            else:
                weight = factor(self.rates[s.name], shared_waited, torch.float32) * float(int(state.shared_step) >= 0)
                loc, scale = (x[s.start:s.stop].reshape(s.shape) for x in (state.shared_loc, state.shared_scale))
            out[s.name] = Belief(loc, scale, weight)
        return out

    # -- predictor interface ---------------------------------------------------------------------------
    def _predict(self, ids: Tensor, step: int) -> LogitNormalPosterior:
        """The logit at the priors of the update at `step`, with each latent's variance carried to it to
        first order (forward-mode derivatives, one model pass per latent coordinate of a prompt)."""
        batch, beliefs = self._batch(ids), self.beliefs(ids, step)
        zeros = {name: torch.zeros_like(b.loc) for name, b in beliefs.items()}
        with torch.no_grad():
            TemperedPriors(beliefs, zeros)(self.model)(batch)
        mean, variance = batch.logit.detach().float(), torch.zeros(ids.shape[0])
        with fwAD.dual_level():
            for name, index, per_prompt in self._directions():
                tangent = torch.zeros_like(zeros[name])
                (tangent.view(tangent.shape[0], -1)[:, index] if per_prompt else tangent.view(-1)[index]).fill_(1.0)
                noise = {**zeros, name: fwAD.make_dual(zeros[name], tangent)}
                TemperedPriors(beliefs, noise)(self.model)(batch)
                derivative = fwAD.unpack_dual(batch.logit).tangent
                if derivative is not None:
                    variance = variance + derivative.detach().float().square()
        return LogitNormalPosterior(mean, variance.sqrt().clamp_min(1e-6))

    def _directions(self):
        for s in self.sites:
            for index in range(s.stop - s.start):
                yield s.name, index, s.per_prompt

    def _observe(self, ids: Tensor, successes: Tensor, trials: Tensor, step: int):
        state = self.state
        seed = self.seed_used * 1_000_003 + int(state.num_updates)
        o, beliefs, batch = self.options, self.beliefs(ids, step), self._batch(ids, successes, trials)
        if o.update == "laplace":
            posterior, info = laplace_posterior(self.model, beliefs, batch, iterations=o.iterations)
        else:
            posterior, info = fit_posterior(self.model, beliefs, batch, steps=o.svi_steps, lr=o.lr, seed=seed,
                                            num_particles=o.num_particles, guide_class=self.Guide)
        if posterior is None:
            raise FloatingPointError(f"{self.name} update failed at step {step}, state unchanged: {info['failed']}")
        n = ids.shape[0]
        prompt = [s for s in self.sites if s.per_prompt]
        shared = [s for s in self.sites if not s.per_prompt]
        changes: dict[str, Any] = {"num_updates": state.num_updates + 1}
        if prompt:
            for field, part in (("prompt_loc", 0), ("prompt_scale", 1)):
                changes[field] = Rows(ids, torch.cat([posterior[s.name][part].reshape(n, -1) for s in prompt], 1))
        changes["prompt_step"] = Rows(ids, torch.full_like(ids, step))
        if shared:
            for field, part in (("shared_loc", 0), ("shared_scale", 1)):
                changes[field] = torch.cat([posterior[s.name][part].reshape(-1) for s in shared]).float()
            changes["shared_step"] = torch.tensor(step)
        return changes, {"elbo": info["elbo"]}


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for size in shape:
        out *= size
    return out
