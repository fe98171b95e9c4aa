"""Up-front memory check: a run, a bench or a replay that cannot fit is refused before it starts.

Without it a size typed one digit too long (`k=1000000000000`, `env.num_prompts=10**12`,
`id_vae.hash_buckets=...`) ends in an allocator traceback, or worse in the kernel's OOM killer halfway
through a run. The predictor's own state is measured, not guessed: the predictor is built on
the `meta` device (shapes only, no memory) at two pool sizes, and its `state_nbytes` gives bytes
per prompt and fixed bytes exactly for the options given. A predictor that cannot be built on
`meta` is built for real on a tiny pool instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psutil
import torch

from mpts.models.base import PromptPool

_PROBE_SIZES = (64, 128)
_GRID_COPIES = 4  # predictive pmf grids alive at once per step (log_prob, exp, where, cumsum)
_POOL_BYTES_PER_PROMPT = 32  # ids, cluster, difficulty, true p and bookkeeping per prompt


class NotEnoughMemory(ValueError):
    """Not enough memory for what was asked; the message says how much would be needed."""


@dataclass(frozen=True)
class MemoryNeed:
    """Bytes by what needs them (named as the user would change them)."""

    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def predictor_state_bytes(cls: type, options: Any, num_prompts: int, feature_dim: int) -> int:
    """The state bytes of predictor `cls` with `options` on a pool of `num_prompts`."""

    def measured(size: int, device: str) -> int:
        with torch.device(device):
            features = torch.zeros(size, feature_dim) if feature_dim else None
            pool = PromptPool(size=size, features=features, clusters=torch.zeros(size, dtype=torch.long))
            return int(cls(pool, options, seed=0).state_nbytes())

    small, large = _PROBE_SIZES
    try:
        a, b = measured(small, "meta"), measured(large, "meta")
    except (RuntimeError, NotImplementedError):  # e.g. an `.item()` at construction
        try:
            a, b = measured(small, "cpu"), measured(large, "cpu")
        except (RuntimeError, MemoryError) as error:
            raise NotEnoughMemory(f"predictor {cls.name}: its options ask for more memory than this machine has "
                               f"({' '.join(str(error).split())[:200]})") from None
    per_prompt = (b - a) / (large - small)
    return int(max(a - per_prompt * small, 0) + per_prompt * num_prompts)


def check_fits(need: MemoryNeed, what: str, available: int | None = None) -> None:
    available = psutil.virtual_memory().available if available is None else available
    if need.total > available:
        biggest = max(need.parts, key=need.parts.get)
        detail = ", ".join(f"{name} {_gib(size)}" for name, size in sorted(need.parts.items(), key=lambda i: -i[1]))
        raise NotEnoughMemory(f"{what} would need about {_gib(need.total)} of memory ({detail}); "
                           f"{_gib(available)} is available; lower {biggest}")


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.3g} GiB"


def step_grid_bytes(candidates: int, k: int) -> int:
    """Predictive pmfs over 0..k for every candidate (float64), a few alive at once."""
    return _GRID_COPIES * 8 * candidates * (k + 1)


def pool_bytes(num_prompts: int, feature_dim: int) -> int:
    return num_prompts * (4 * feature_dim + _POOL_BYTES_PER_PROMPT)


def run_need(config) -> MemoryNeed:
    """What one run of `config` (a RunConfig) holds at once: pool, predictor state, per-step grids."""
    from mpts.models.registry import get_predictor_class
    from mpts.training.environments.base import get_environment_class

    env_class = get_environment_class(config.env.name)
    env_options = config.env.with_options(env_class.Options)
    num_prompts = int(getattr(env_options, "num_prompts", 0))
    feature_dim = env_class.feature_dim(env_options)  # the LM's text embeddings too, not only a simulator option
    cls = get_predictor_class(config.predictor.name)
    return MemoryNeed({
        "env.num_prompts": pool_bytes(num_prompts, feature_dim),
        f"the {config.predictor.name} predictor's options or env.num_prompts": predictor_state_bytes(
            cls, config.predictor.with_options(cls.Options), num_prompts, feature_dim),
        "k or batch_size x candidate_ratio": step_grid_bytes(config.num_candidates, config.k),
        **env_class.state_bytes(env_options),
    })
