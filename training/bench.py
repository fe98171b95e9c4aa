"""`mpts bench`: milliseconds per step of predict + select + observe, and state bytes per prompt.

Synthetic truth (p_i ~ Beta(2, 2)) stands in for the learner, so only the predictor and the rule
are timed, through the same Selector the loop uses; drawing candidates and outcomes is outside the
timed region. Prints figures; asserts nothing.

The timed calls run with `threads` intra-op threads (default: the loop's `predictor_threads`).
`bench_under_load` times the same benchmark twice in one invocation, quietly and then with N busy
processes alongside (a trainer's CPU is never idle), and reports the slowdown ratio.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mpts.models.base import PromptPool
from mpts.training.memory import MemoryNeed, check_fits, pool_bytes, predictor_state_bytes
from mpts.training.selector_factory import build_selector, plan_selector
from mpts.training.threads import DEFAULT_PREDICTOR_THREADS, intra_op_threads

NEEDS_FEATURES = {"gp", "id_vae"}


def bench(predictor: str = "beta", pool: int = 1_000_000, candidates: int = 4096, batch: int = 256, k: int = 8,
          steps: int = 50, rule: str = "thompson_target", options: dict[str, Any] | None = None,
          feature_dim: int | None = None, warmup: int = 3, seed: int = 0,
          threads: int | None = DEFAULT_PREDICTOR_THREADS) -> dict[str, Any]:
    """Time the Selector's calls as every way in makes them. A rule that rolls out every candidate
    (dynamic sampling) observes the chunks of `batch` it would have rolled out to keep `batch`
    informative groups; a rule that needs the truth (oracle) ranks on the synthetic p."""
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if feature_dim is None:
        feature_dim = 16 if predictor in NEEDS_FEATURES else 0
    plan = plan_selector(predictor, rule, predictor_options=options)
    check_fits(MemoryNeed({"--pool": pool_bytes(pool, feature_dim),
                           "--pool (predictor state)": predictor_state_bytes(plan.predictor, plan.predictor_options,
                                                                             pool, feature_dim),
                           "--candidates or --k": 8 * candidates * (k + 1) * 4}), "this benchmark")
    torch.manual_seed(seed)
    truth = torch.distributions.Beta(2.0, 2.0).sample((pool,))
    features = torch.randn(pool, feature_dim) if feature_dim else None
    outcomes = torch.Generator().manual_seed(seed)
    selector = build_selector(plan, PromptPool(size=pool, features=features), k=k, seed=seed)
    model = selector.predictor

    phases: dict[str, list[float]] = {"predict": [], "select": [], "observe": [], "total": []}
    informative_shares = []
    for step in range(warmup + steps):
        ids_pool = selector.sample_candidates(candidates, step)
        truth_of = truth[ids_pool] if selector.rule.needs_truth else None
        with intra_op_threads(threads):
            selection = selector.select(ids_pool, batch, step, truth=truth_of)
        chosen, successes = _rolled_out(selection.rows, truth, batch, k, outcomes, selector.rule.rolls_out_all)
        with intra_op_threads(threads):
            t0 = time.perf_counter()
            selector.observe(chosen, successes, torch.full((chosen.shape[0],), float(k)), step)
            observe = time.perf_counter() - t0
        if step >= warmup:
            p = truth[chosen]
            informative_shares.append(float((1 - p.pow(k) - (1 - p).pow(k)).mean()))
            phases["predict"].append(selection.seconds["predict"])
            phases["select"].append(selection.seconds["select"])
            phases["observe"].append(observe)
            phases["total"].append(selection.seconds["predict"] + selection.seconds["select"] + observe)
    state_bytes = model.state_nbytes()
    return {
        "predictor": predictor, "rule": rule, "pool": pool, "candidates": candidates, "batch": batch, "k": k,
        "steps": steps, "threads": threads if threads is not None else torch.get_num_threads(),
        "median_ms_per_step": 1e3 * float(np.median(phases["total"])),
        "p90_ms_per_step": 1e3 * float(np.percentile(phases["total"], 90)),
        **{f"median_{name}_ms": 1e3 * float(np.median(values)) for name, values in phases.items() if name != "total"},
        "state_bytes": state_bytes, "state_bytes_per_prompt": state_bytes / pool,
        # P(0 < S < k) under the true p of the prompts rolled out: what the rule bought
        "true_informative_share": float(np.mean(informative_shares)),
    }


def bench_under_load(background_load: int, **options: Any) -> dict[str, Any]:
    """`bench(**options)` quietly, then with `background_load` busy processes alongside.

    Both runs are in this invocation, on the same machine state, so the ratio is the slowdown the
    load causes (other work on a shared machine weighs on both alike).
    """
    if isinstance(background_load, bool) or int(background_load) != background_load or background_load < 1:
        raise ValueError(f"--background-load must be a whole number >= 1, got {background_load!r}")
    quiet = bench(**options)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(int(background_load))]
    try:
        time.sleep(0.5)  # let them reach the run queue
        loaded = bench(**options)
    finally:
        for process in busy:  # only the processes started here, by handle
            process.kill()
            process.wait()
    return {
        **{key: value for key, value in quiet.items() if not key.startswith(("median", "p90"))},
        "background_load": int(background_load),
        "quiet_median_ms_per_step": quiet["median_ms_per_step"], "loaded_median_ms_per_step": loaded["median_ms_per_step"],
        "quiet_p90_ms_per_step": quiet["p90_ms_per_step"], "loaded_p90_ms_per_step": loaded["p90_ms_per_step"],
        "slowdown": loaded["median_ms_per_step"] / quiet["median_ms_per_step"],
        "slowdown_p90": loaded["p90_ms_per_step"] / quiet["p90_ms_per_step"],
    }


def _rolled_out(order: Tensor, truth: Tensor, batch: int, k: int, generator: torch.Generator,
                all_candidates: bool) -> tuple[Tensor, Tensor]:
    """(ids, successes) of what the loop would roll out: the first `batch`, or for dynamic sampling
    whole chunks of `batch` until `batch` informative groups are in (as `loop.rollout_in_chunks`)."""
    successes = (torch.rand(k, order.shape[0], generator=generator) < truth[order]).sum(0, dtype=torch.float32)
    if not all_candidates:
        return order[:batch], successes[:batch]
    informative = ((successes > 0) & (successes < k)).long().cumsum(0)
    reached = torch.nonzero(informative >= batch)
    end = order.shape[0] if reached.numel() == 0 else (int(reached[0]) // batch + 1) * batch
    return order[:end], successes[:end]
