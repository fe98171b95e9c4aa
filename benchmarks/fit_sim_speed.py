"""Seconds `mpts fit-sim` takes on a trace of the size issue 18 names (120 steps, ~20k groups).

    python benchmarks/fit_sim_speed.py                  # 120 steps x 168 groups of 8, 2000 prompts, 4 clusters
    python benchmarks/fit_sim_speed.py --steps 200 --batch 256

The trace comes from the simulated learner under uniform selection, so the truth is known: the
script also prints how far each identified parameter landed from it, in posterior sds.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pandas as pd
import torch

from mpts.training.environments.simulator import SimulatedLearner, SimulatorOptions
from mpts.training.fit_sim import fit, fit_data, predictive_check


def uniform_trace(seed: int, steps: int, batch: int, k: int, options: SimulatorOptions):
    env = SimulatedLearner(options, seed=seed)
    pick = torch.Generator().manual_seed(seed + 1)
    frames = []
    for step in range(steps):
        ids = torch.randperm(options.num_prompts, generator=pick)[:batch]
        outcome = env.rollout(ids, k)
        env.train_on(outcome)
        frames.append(pd.DataFrame({"step": step, "prompt_id": ids.numpy(), "trials": k,
                                    "successes": outcome.successes.numpy().astype(np.int64)}))
    return pd.concat(frames, ignore_index=True), env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch", type=int, default=168)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    options = SimulatorOptions(num_prompts=2000, num_clusters=4)
    trace, env = uniform_trace(args.seed, args.steps, args.batch, args.k, options)
    data = fit_data(trace, {i: int(c) for i, c in enumerate(env.clusters.tolist())})
    started = time.perf_counter()
    result = fit(data, seed=args.seed)
    fitted = time.perf_counter()
    _, verdict = predictive_check(result, seed=args.seed)
    checked = time.perf_counter()
    table = result.parameters().set_index("parameter")
    truth = {"learning_rate": options.slope * options.learning_rate, "transfer": options.transfer,
             "difficulty_std": options.slope * options.difficulty_std}
    print(json.dumps({
        "groups": len(trace), "steps": args.steps, "fit_seconds": round(fitted - started, 2),
        "check_seconds": round(checked - fitted, 2), "total_seconds": round(checked - started, 2),
        "objective_evaluations": len(result.elbo), "misfit": verdict["misfit"],
        "z_from_truth": {n: round((table.loc[n, "mean"] - v) / table.loc[n, "sd"], 2) for n, v in truth.items()},
    }))


if __name__ == "__main__":
    main()
