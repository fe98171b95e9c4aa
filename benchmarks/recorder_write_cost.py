"""Seconds a step's run-folder write costs when the run holds ~1k trace rows and when it holds ~256k.

    nice -n 10 python benchmarks/recorder_write_cost.py                    # RunRecorder, defaults and a part per step
    nice -n 10 python benchmarks/recorder_write_cost.py --writer old-trl   # at a commit before training/recorder.py

Writers:
- `recorder` (default): `training/recorder.py: RunRecorder.add_step` with its default flush policy
  (a part every FLUSH_ROWS rows or FLUSH_SECONDS), and with `flush_rows=1` (a part and a manifest
  entry after every step: the worst case, nothing buffered).
- `old-trl`: the TRL adapter's `_write_run_folder` as it was before the recorder (it rewrote config,
  trace, metrics and summary after every generation), called on a stand-in trainer; it exists only
  in commits before the recorder, so run this script there (e.g. a `git worktree` of main on
  PYTHONPATH), with the same arguments.

Steps carry `--rows-per-step` synthetic trace rows (the schema's columns) and one metrics row. A
write's cost is the mean over `--window` consecutive steps starting where the run holds ~1k rows,
and again at ~256k rows (for `recorder` that includes the parts written inside the window, so it
is the amortised cost). Prints one JSON line per writer and size, then the 256k/1k ratios.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

SIZES = (1_000, 256_000)


def synthetic_step(step: int, rows: int, rng: np.random.Generator) -> tuple[pd.DataFrame, dict]:
    from mpts.inference.schema import PREDICTION_COLUMNS, METRICS_REQUIRED

    trials = np.full(rows, 8, dtype=np.int64)
    successes = rng.integers(0, 9, rows)
    trace = pd.DataFrame({"step": np.full(rows, step, dtype=np.int64), "prompt_id": rng.integers(0, 10**6, rows),
                          "successes": successes, "trials": trials,
                          **{c: rng.random(rows) for c in PREDICTION_COLUMNS},
                          "selected_by": "thompson_target", "kept": True, "failed": False, "true_p": np.nan})
    metrics = {c: float(rng.random()) for c in METRICS_REQUIRED}
    metrics.update(step=step, rollouts=rows * 8, cumulative_rollouts=(step + 1) * rows * 8,
                   eval_accuracy=float("nan"), global_step=step)
    return trace, metrics


def measure_recorder(out: Path, rows_per_step: int, window: int, **policy) -> dict[int, float]:
    from mpts.training.recorder import RunRecorder

    recorder = RunRecorder(out, **policy)
    recorder.folder.create("name: bench\n")
    rng = np.random.default_rng(0)
    costs, step = {}, 0
    for size in SIZES:
        while step * rows_per_step < size:  # fill the run up to the size, untimed
            recorder.add_step(step, *synthetic_step(step, rows_per_step, rng))
            step += 1
        batch = [synthetic_step(s, rows_per_step, rng) for s in range(step, step + window)]
        start = time.perf_counter()
        for offset, (trace, metrics) in enumerate(batch):
            recorder.add_step(step + offset, trace, metrics)
        costs[size] = (time.perf_counter() - start) / window
        step += window
    return costs


def measure_old_trl(out: Path, rows_per_step: int, window: int) -> dict[int, float]:
    from mpts.integrations import trl as adapter
    from mpts.training.acquisition import get_acquisition_class

    trainer = adapter.SelectiveGRPOTrainer
    if not hasattr(trainer, "_write_run_folder"):
        raise SystemExit("this checkout has no old TRL writer (SelectiveGRPOTrainer._write_run_folder); run "
                         "--writer old-trl at a commit before training/recorder.py")
    stand_in = SimpleNamespace(mpts_dir=out, selection=adapter.SelectionOptions(), num_generations=8,
                               selector=SimpleNamespace(streams=SimpleNamespace(seed=0),
                                                        rule=get_acquisition_class("thompson_target")()),
                               _mpts_trace=[], _mpts_metrics=[])
    stand_in._tables = lambda: trainer._tables(stand_in)
    rng = np.random.default_rng(0)
    costs, step = {}, 0
    for size in SIZES:
        while step * rows_per_step < size:  # the rows so far, held in memory
            trace, metrics = synthetic_step(step, rows_per_step, rng)
            stand_in._mpts_trace.append(trace)
            stand_in._mpts_metrics.append(metrics)
            step += 1
        spent = 0.0
        for offset in range(window):  # each generation appends its rows, then rewrites the folder
            trace, metrics = synthetic_step(step + offset, rows_per_step, rng)
            start = time.perf_counter()
            stand_in._mpts_trace.append(trace)
            stand_in._mpts_metrics.append(metrics)
            trainer._write_run_folder(stand_in)
            spent += time.perf_counter() - start
        costs[size] = spent / window
        step += window
    return costs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writer", choices=("recorder", "old-trl"), default="recorder")
    parser.add_argument("--rows-per-step", type=int, default=64, help="trace rows a step adds (prompts per step)")
    parser.add_argument("--window", type=int, default=None,
                        help="steps timed at each size (default: recorder 2 x FLUSH_ROWS / rows per step, old-trl 8)")
    options = parser.parse_args(argv)
    if options.window is None:
        from_flush = 2 * max(1, 8192 // options.rows_per_step)  # recorder.FLUSH_ROWS (absent in old commits)
        options.window = 8 if options.writer == "old-trl" else from_flush
    variants = ({"old-trl": lambda out: measure_old_trl(out, options.rows_per_step, options.window)}
                if options.writer == "old-trl" else
                {"recorder (default flush)": lambda out: measure_recorder(out, options.rows_per_step, options.window),
                 "recorder (a part every step)": lambda out: measure_recorder(
                     out, options.rows_per_step, options.window, flush_rows=1)})
    for name, measure in variants.items():
        with tempfile.TemporaryDirectory(prefix="mpts-write-cost-") as out:
            costs = measure(Path(out) / "run")
        for size, seconds in costs.items():
            print(json.dumps({"writer": name, "rows_so_far": size, "rows_per_step": options.rows_per_step,
                              "seconds_per_step": round(seconds, 6)}), flush=True)
        print(json.dumps({"writer": name, "ratio_256k_to_1k": round(costs[SIZES[1]] / costs[SIZES[0]], 2)}),
              flush=True)


if __name__ == "__main__":
    main()
