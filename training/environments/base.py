"""The environment seam: what the common loop needs from a learner it trains.

Two implementations: the simulated learner (`training.environments.simulator`, known truth,
milliseconds a step) and the LM + GRPO environment (`training.environments.lm.env`). The loop never knows which it drives.
"""

from __future__ import annotations

import abc
import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from mpts.models.base import PromptPool
from mpts.models.options import StrictOptions
from mpts.models.registry import Registry


class EnvironmentOptions(StrictOptions):
    """Base of every environment's options (see `StrictOptions`)."""


@dataclasses.dataclass
class Outcomes:
    """What k rollouts of each chosen prompt produced.

    `failed` marks prompts whose rollout or reward crashed: they are recorded in the trace
    but neither observed by the predictor nor trained on. `info` carries per-step extras; keys
    ending in `_seconds` (e.g. `sync_seconds`) are logged as timing columns.
    """

    ids: Tensor  # int64 [n]
    successes: Tensor  # float32 [n], 0..trials
    trials: Tensor  # float32 [n]
    true_p: Tensor | None = None  # simulator only: the success probability the draw used
    failed: Tensor | None = None  # bool [n]
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    greedy_solved: Tensor | None = None  # LM only: bool [n], greedy decoding already solved it (before the update)

    def __post_init__(self) -> None:
        if self.failed is None:
            self.failed = torch.zeros(self.ids.shape[0], dtype=torch.bool)

    @property
    def informative(self) -> Tensor:
        """0 < s < k: groups with a non-zero GRPO signal."""
        return (self.successes > 0) & (self.successes < self.trials) & ~self.failed

    def take(self, index: Tensor) -> "Outcomes":
        def pick(x):
            return None if x is None else x[index]
        return Outcomes(self.ids[index], self.successes[index], self.trials[index],
                        pick(self.true_p), pick(self.failed), dict(self.info), pick(self.greedy_solved))

    @staticmethod
    def cat(parts: list["Outcomes"]) -> "Outcomes":
        def cat(name):
            values = [getattr(p, name) for p in parts]
            return None if any(v is None for v in values) else torch.cat(values)
        info: dict[str, Any] = {}
        for part in parts:  # timings add up across chunks; other extras: last one wins
            for key, value in part.info.items():
                info[key] = info.get(key, 0.0) + value if key.endswith("_seconds") else value
        return Outcomes(cat("ids"), cat("successes"), cat("trials"), cat("true_p"), cat("failed"), info,
                        cat("greedy_solved"))


class Environment(abc.ABC):
    """A learner the loop can roll out, train and evaluate.

    Constructed as `Env(options, seed=..., run_dir=...)`; `run_dir` is where an environment may
    keep files (a tiny model's weights, cached embeddings).
    """

    name: ClassVar[str]
    Options: ClassVar[type[EnvironmentOptions]] = EnvironmentOptions
    provides_truth: ClassVar[bool] = False  # true_success() knows p (rules with needs_truth require it)

    def __init__(self, options: EnvironmentOptions | None = None, seed: int = 0, run_dir: Path | None = None):
        self.options = options if options is not None else self.Options()
        self.seed = seed
        self.run_dir = run_dir

    @property
    @abc.abstractmethod
    def pool(self) -> PromptPool:
        """The training prompts (ids 0..size-1) and what is known about them up front."""

    @abc.abstractmethod
    def rollout(self, ids: Tensor, k: int) -> Outcomes:
        """Sample k completions per prompt under the current policy and grade them."""

    @abc.abstractmethod
    def train_on(self, outcomes: Outcomes) -> dict[str, float]:
        """One policy update on these groups; returns scalar diagnostics (e.g. loss)."""

    @abc.abstractmethod
    def evaluate(self) -> float:
        """Accuracy on the held-out evaluation set under the current policy."""

    @classmethod
    def feature_dim(cls, options: EnvironmentOptions) -> int:
        """Width of `pool.features` for these options (0: none), known before the pool is built, so
        a run's memory can be checked with the features its predictor will get."""
        return int(getattr(options, "feature_dim", 0) or 0)

    @classmethod
    def state_bytes(cls, options: EnvironmentOptions) -> dict[str, int]:
        """Bytes the environment holds besides the pool, by the option that sets them (checked
        before the run with the rest of its memory)."""
        return {}

    def use_generator(self, generator: torch.Generator) -> None:
        """Draw the coming rollouts' randomness from `generator` (the loop passes one per step, so
        paired arms share it). Environments that seed themselves otherwise may ignore it."""

    def true_success(self, ids: Tensor) -> Tensor | None:
        """The true success probabilities (simulator only); None where unknown."""
        return None

    def evaluate_metrics(self) -> dict[str, float]:
        """Every held-out accuracy the environment measures; `eval_accuracy` is the one targets use."""
        return {"eval_accuracy": self.evaluate()}

    def accuracy_on(self, ids: Tensor) -> Tensor | None:
        """Per-prompt accuracy of the current policy on pool prompts, measured as `evaluate` measures
        the held-out set (the simulator: the exact p); None where it cannot be measured."""
        return self.true_success(ids)

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: policy, optimiser, RNG states."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None:
        """Release engines, processes, files."""


ENVIRONMENTS: Registry = Registry("environment", {
    "sim": "mpts.training.environments.simulator:SimulatedLearner",
    "lm": "mpts.training.environments.lm.env:LMEnvironment",
})
register_environment = ENVIRONMENTS.register
get_environment_class = ENVIRONMENTS.get
