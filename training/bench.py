"""`mpts bench`: milliseconds per step of predict + select + observe, and state bytes per prompt.

Synthetic truth (p_i ~ Beta(2, 2)) stands in for the learner, so only the predictor and the rule
are timed; drawing the outcomes is outside the timed region. Prints figures; asserts nothing.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from mpts.models.base import PromptPool
from mpts.models.registry import get_predictor_class
from mpts.training.acquisition import get_acquisition_class, sample_candidates

NEEDS_FEATURES = {"gp", "id_vae"}


def bench(predictor: str = "beta", pool: int = 1_000_000, candidates: int = 4096, batch: int = 256, k: int = 8,
          steps: int = 50, rule: str = "thompson_target", options: dict[str, Any] | None = None,
          feature_dim: int | None = None, warmup: int = 3, seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    truth = torch.distributions.Beta(2.0, 2.0).sample((pool,))
    if feature_dim is None:
        feature_dim = 16 if predictor in NEEDS_FEATURES else 0
    features = torch.randn(pool, feature_dim) if feature_dim else None
    cls = get_predictor_class(predictor)
    model = cls(PromptPool(size=pool, features=features), cls.Options(**(options or {})), seed=seed)
    acquisition_cls = get_acquisition_class(rule)
    acquisition = acquisition_cls(acquisition_cls.Options())

    phases: dict[str, list[float]] = {"predict": [], "select": [], "observe": [], "total": []}
    for step in range(warmup + steps):
        ids_pool = sample_candidates(pool, candidates, generator)
        t0 = time.perf_counter()
        posterior = model.predict(ids_pool, step)
        t1 = time.perf_counter()
        chosen = ids_pool[acquisition.select(posterior, batch, generator, k)]
        t2 = time.perf_counter()
        successes = torch.binomial(torch.full((batch,), float(k)), truth[chosen], generator=generator)
        t3 = time.perf_counter()
        model.observe(chosen, successes, torch.full((batch,), float(k)), step)
        t4 = time.perf_counter()
        if step >= warmup:
            phases["predict"].append(t1 - t0)
            phases["select"].append(t2 - t1)
            phases["observe"].append(t4 - t3)
            phases["total"].append((t2 - t0) + (t4 - t3))
    state_bytes = model.state_nbytes()
    return {
        "predictor": predictor, "rule": rule, "pool": pool, "candidates": candidates, "batch": batch, "k": k,
        "steps": steps, "threads": torch.get_num_threads(),
        "median_ms_per_step": 1e3 * statistics.median(phases["total"]),
        "p90_ms_per_step": 1e3 * sorted(phases["total"])[int(0.9 * (len(phases["total"]) - 1))],
        **{f"median_{name}_ms": 1e3 * statistics.median(values) for name, values in phases.items() if name != "total"},
        "state_bytes": state_bytes, "state_bytes_per_prompt": state_bytes / pool,
    }
