"""Runs per minute of a grid of short simulator runs under each executor, and the driver's peak memory.

    python benchmarks/ablate_executors.py                 # 200 runs (2 arms x 10 grid points x 10 seeds), local and ray
    python benchmarks/ablate_executors.py --seeds 20 --workers 2 --executors ray

Each executor runs in a fresh driver process, so its peak resident memory (ru_maxrss of the driver
alone; workers are other processes) is its own. The wall time is the whole `ablate` call as a user
sees it: for `ray` it includes starting the local Ray instance.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def grid_config(seeds: int, steps: int, workers: int) -> dict:
    return {
        "name": "bench", "steps": steps, "batch_size": 8, "candidate_ratio": 2, "checkpoint_every": steps,
        "posterior_draws_prompts": 4, "env": {"name": "sim", "num_prompts": 200, "eval_prompts": 50},
        "ablation": {
            "seeds": list(range(seeds)), "workers": workers,
            "arms": [{"predictor": "beta", "acquisition": "uniform"},
                     {"predictor": "beta", "acquisition": "thompson_target"}],
            "grid": {"predictor.decay": [0.5, 0.7, 0.8, 0.9, 0.99], "candidate_ratio": [2, 4]},
        },
    }


def measure(executor: str, seeds: int, steps: int, workers: int) -> dict:
    """One executor, in this process: run the grid into a temporary folder."""
    from mpts.training.ablate import ablate
    from mpts.training.config import validate_config
    from mpts.training.sweep import expand_grid

    config = validate_config(grid_config(seeds, steps, workers))
    runs = len(expand_grid(config))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory(prefix="mpts-bench-") as out:
        start = time.perf_counter()
        ablate(config, Path(out), executor=executor, show_progress=False)
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"executor": executor, "runs": runs, "workers": workers, "steps": steps, "seconds": round(seconds, 1),
            "runs_per_minute": round(60 * runs / seconds, 1), "driver_peak_rss_mib": round(peak / 1024, 1),
            "driver_rss_before_mib": round(before / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--executors", nargs="+", default=["local", "ray"], choices=["local", "ray"])
    parser.add_argument("--seeds", type=int, default=10, help="runs = 20 x seeds")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="parallel runs (local processes, local Ray CPUs)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one executor in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.seeds, args.steps, args.workers)))
        return
    results = []
    for executor in args.executors:
        child = subprocess.run([sys.executable, __file__, "--one", executor, "--seeds", str(args.seeds),
                                "--steps", str(args.steps), "--workers", str(args.workers)],
                               capture_output=True, text=True)
        if child.returncode != 0:
            sys.exit(f"{executor} failed:\n{child.stderr[-3000:]}")
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
        result = results[-1]
        print(f"{executor:>6}: {result['runs']} runs in {result['seconds']} s = {result['runs_per_minute']} runs/min "
              f"({args.workers} workers); driver peak RSS {result['driver_peak_rss_mib']} MiB "
              f"({result['driver_rss_before_mib']} MiB before the grid)", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
