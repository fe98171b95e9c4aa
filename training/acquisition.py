"""Acquisition rules: which of this step's candidates to roll out, given a predictor's posterior.

Rules never model and predictors never choose: any rule works with any `SuccessPosterior`.
`select` returns positions into the candidate batch (distinct, `batch_size` of them, except
`dynamic_sampling`, which orders all candidates). Ties are broken at random by the generator.

Class flags tell the loop what a rule needs, and reports what it is:

- `needs_truth`: the loop passes a `PointMassPosterior` of the true p (simulator only);
- `rolls_out_all`: the loop rolls the returned candidates out in chunks of `batch_size` until
  `batch_size` informative groups (0 < s < k) are kept, and counts every rollout it spent;
- `baseline`: a reference arm every other arm is compared with, paired by seed (uniform, DAPO
  dynamic sampling); a rule with `needs_truth` is a reference of another kind (an upper bound).

`sample_candidates` draws the step's candidate ids uniformly without replacement from the pool.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import torch
from pydantic import Field, model_validator
from torch import Tensor

from mpts.models.base import SuccessPosterior
from mpts.models.options import StrictOptions
from mpts.models.registry import Registry


class AcquisitionOptions(StrictOptions):
    """Base of every rule's options; unknown keys, booleans as numbers and NaN/inf are errors."""


class Acquisition(abc.ABC):
    name: ClassVar[str]
    Options: ClassVar[type[AcquisitionOptions]] = AcquisitionOptions
    needs_truth: ClassVar[bool] = False
    rolls_out_all: ClassVar[bool] = False
    baseline: ClassVar[bool] = False

    def __init__(self, options: AcquisitionOptions | None = None):
        self.options = options if options is not None else self.Options()

    def select(self, posterior: SuccessPosterior, batch_size: int, generator: torch.Generator, k: int) -> Tensor:
        """Positions (int64) into the candidate batch of the prompts to roll out."""
        check_batch_size(batch_size, len(posterior))
        if isinstance(k, bool) or int(k) != k or k < 1:
            raise ValueError(f"k (rollouts per prompt) must be a positive integer, got {k!r}")
        return self._select(posterior, int(batch_size), generator, int(k))

    @abc.abstractmethod
    def _select(self, posterior: SuccessPosterior, batch_size: int, generator: torch.Generator, k: int) -> Tensor:
        """The rule itself; inputs already checked."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"


def reference_role(rule: Acquisition | type[Acquisition]) -> str | None:
    """What a run records about its rule for reports: "sees_truth", "baseline" or None."""
    return "sees_truth" if rule.needs_truth else "baseline" if rule.baseline else None


def check_batch_size(batch_size: int, num_candidates: int) -> None:
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if batch_size > num_candidates:
        raise ValueError(f"batch_size {batch_size} is larger than the {num_candidates} candidates to choose from")


def top_b(scores: Tensor, batch_size: int, generator: torch.Generator, rule: str) -> Tensor:
    """Positions of the `batch_size` highest scores, ties broken uniformly at random.

    The scores are looked at in a random order; whichever tied positions topk keeps, the
    candidates behind them are then a uniform choice among the tied ones.
    """
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"acquisition {rule!r}: the posterior gave NaN or infinite scores")
    order = torch.randperm(scores.shape[0], generator=generator)
    best = torch.topk(scores[order], batch_size, sorted=True).indices
    return order[best]


class Uniform(Acquisition):
    """B candidates uniformly at random: the baseline."""

    name = "uniform"
    baseline = True

    def _select(self, posterior, batch_size, generator, k):
        return torch.randperm(len(posterior), generator=generator)[:batch_size]


class DynamicSampling(Acquisition):
    """DAPO: roll out every candidate (in random order) and keep only groups with 0 < s < k."""

    name = "dynamic_sampling"
    rolls_out_all = True
    baseline = True

    def _select(self, posterior, batch_size, generator, k):
        return torch.randperm(len(posterior), generator=generator)


class Oracle(Acquisition):
    """Top-B on P(0 < S < k) under the true p (the loop hands it a PointMassPosterior)."""

    name = "oracle"
    needs_truth = True

    def _select(self, posterior, batch_size, generator, k):
        return top_b(posterior.p_informative(k), batch_size, generator, self.name)


class ThompsonTargetOptions(AcquisitionOptions):
    target: float = Field(0.5, ge=0.0, le=1.0, description="gamma: the success rate the draws should be closest to")


class ThompsonTarget(Acquisition):
    """MoPPS: one posterior draw per candidate; the B draws closest to the target rate."""

    name = "thompson_target"
    Options = ThompsonTargetOptions

    def _select(self, posterior, batch_size, generator, k):
        draw = posterior.sample(1, generator)[0]
        return top_b(-(draw - self.options.target).abs(), batch_size, generator, self.name)


class ThompsonThresholdOptions(AcquisitionOptions):
    low: float = Field(0.3, ge=0.0, le=1.0, description="lower end of the preferred success-rate interval")
    high: float = Field(0.7, ge=0.0, le=1.0, description="upper end of the preferred success-rate interval")

    @model_validator(mode="after")
    def _ordered(self) -> "ThompsonThresholdOptions":
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        return self


class ThompsonThreshold(Acquisition):
    """MoPPS threshold variant: draws inside [low, high] first (at random among them if there are
    too many), then the draws nearest the interval."""

    name = "thompson_threshold"
    Options = ThompsonThresholdOptions

    def _select(self, posterior, batch_size, generator, k):
        draw = posterior.sample(1, generator)[0]
        outside = (self.options.low - draw).clamp_min(0) + (draw - self.options.high).clamp_min(0)
        return top_b(-outside, batch_size, generator, self.name)


class TopInformative(Acquisition):
    """DPS: the B candidates most likely to give a GRPO signal, P(0 < S < k)."""

    name = "top_informative"

    def _select(self, posterior, batch_size, generator, k):
        return top_b(posterior.p_informative(k), batch_size, generator, self.name)


class RiskOptions(AcquisitionOptions):
    use_sample: bool = Field(False, description="rank a Thompson draw of p instead of the posterior mean")


class Risk(Acquisition):
    """CVaR-style tail: the B candidates with the lowest predicted success (the hardest)."""

    name = "risk"
    Options = RiskOptions

    def _select(self, posterior, batch_size, generator, k):
        predicted = posterior.sample(1, generator)[0] if self.options.use_sample else posterior.mean
        return top_b(-predicted, batch_size, generator, self.name)


class Uncertainty(Acquisition):
    """The B candidates whose success rate the predictor is least sure of (largest variance)."""

    name = "uncertainty"

    def _select(self, posterior, batch_size, generator, k):
        return top_b(posterior.variance, batch_size, generator, self.name)


RULES: Registry = Registry("acquisition rule")
for _rule in (Uniform, DynamicSampling, Oracle, ThompsonTarget, ThompsonThreshold, TopInformative, Risk, Uncertainty):
    RULES.register(_rule)
register_rule = RULES.register
get_acquisition_class = RULES.get


def sample_candidates(num_prompts: int, num_candidates: int, generator: torch.Generator) -> Tensor:
    """`num_candidates` distinct prompt ids, a uniformly random subset of 0..num_prompts-1.

    For a small share of a large pool, draw ids with replacement (about twice as many as needed),
    drop repeats and keep a random subset of the distinct ones: by symmetry every subset is
    equally likely, and no permutation of the whole pool is ever built. A large share falls back
    to randperm.
    """
    if num_prompts < 1:
        raise ValueError(f"the prompt pool is empty (num_prompts={num_prompts}): no candidates to draw")
    if num_candidates < 1:
        raise ValueError(f"num_candidates must be at least 1, got {num_candidates}")
    if num_candidates > num_prompts:
        raise ValueError(f"num_candidates {num_candidates} is larger than the pool of {num_prompts} prompts")
    if num_candidates * 4 > num_prompts:
        return torch.randperm(num_prompts, generator=generator)[:num_candidates]
    draws = 2 * num_candidates + 64
    while True:
        distinct = torch.unique(torch.randint(0, num_prompts, (draws,), generator=generator))
        if distinct.shape[0] >= num_candidates:
            break
        draws *= 2  # rare: too many repeats; redraw larger (still deterministic under the generator)
    keep = torch.randperm(distinct.shape[0], generator=generator)[:num_candidates]
    return distinct[keep]
