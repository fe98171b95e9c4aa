"""SIGKILL at a random moment, resume, compare row by row with an uninterrupted run.

Used by tests/test_kill_resume.py (a few trials in CI) and runnable for more trials:

    .venv/bin/python tests/kill_resume.py --trials 20 --seed 1

prints one JSON object: trials, kills, resumes, rows lost / duplicated / changed, failed resumes.
Each trial starts `mpts run` in a subprocess, kills it with SIGKILL at a random moment after its
folder exists, sometimes kills the resume too, resumes until it finishes, and compares its
trace with the reference run's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

SETTINGS = ["steps=300", "batch_size=16", "candidate_ratio=4", "env.num_prompts=400", "env.eval_prompts=100",
            "checkpoint_every=7", "posterior_draws_prompts=10"]
KEY = ["step", "prompt_id"]


def _mpts(*args: str) -> list[str]:
    sets = [item for setting in SETTINGS for item in ("--set", setting)] if args[0] == "run" and "--resume" not in args else []
    return [sys.executable, "-m", "mpts.training.cli", *args, *sets]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def compare_traces(reference: pd.DataFrame, resumed: pd.DataFrame) -> dict[str, int]:
    """Rows lost, duplicated and changed in `resumed`, keyed by (step, prompt_id)."""
    counts = (reference.groupby(KEY).size().to_frame("reference")
              .join(resumed.groupby(KEY).size().to_frame("resumed"), how="outer").fillna(0))
    lost = int((counts.reference - counts.resumed).clip(lower=0).sum())
    duplicated = int((counts.resumed - counts.reference).clip(lower=0).sum())
    both = reference.merge(resumed.drop_duplicates(KEY), on=KEY, suffixes=("", "__resumed"))
    differs = np.zeros(len(both), dtype=bool)
    for column in reference.columns.difference(KEY):
        a, b = both[column], both[f"{column}__resumed"]
        differs |= ~((a == b) | (a.isna() & b.isna())).to_numpy()
    return {"rows": len(reference), "lost": lost, "duplicated": duplicated, "changed": int(differs.sum())}


def _start_and_kill(command: list[str], folder: Path, delay: float) -> bool:
    """Run `command`; SIGKILL it `delay` s after `folder/config.yaml` exists. True if it was killed."""
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while not (folder / "config.yaml").exists() and process.poll() is None:
        time.sleep(0.005)
    time.sleep(delay)
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
        process.wait()
        return True
    _, err = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {err.decode()[-2000:]}")
    return False


def kill_and_resume(workdir: Path, trials: int, seed: int, max_delay: float = 2.0) -> dict[str, int]:
    rng = random.Random(seed)
    reference = workdir / "reference"
    subprocess.run(_mpts("run", "quickstart", "--out", str(reference)), env=_env(), check=True,
                   stdout=subprocess.DEVNULL)
    expected = pd.read_parquet(reference / "trace.parquet")
    totals = {"trials": trials, "kills": 0, "resumes": 0, "rows": 0, "lost": 0, "duplicated": 0, "changed": 0,
              "failed_resumes": 0, "finished_before_kill": 0}
    for trial in range(trials):
        folder = workdir / f"trial{trial}"
        killed = _start_and_kill(_mpts("run", "quickstart", "--out", str(folder)), folder, rng.uniform(0, max_delay))
        totals["kills"] += killed
        totals["finished_before_kill"] += not killed
        if killed and rng.random() < 0.5:  # kill the resume as well, at its own random moment
            totals["resumes"] += 1
            totals["kills"] += _start_and_kill(_mpts("run", "--resume", str(folder)), folder, rng.uniform(0, max_delay))
        if not (folder / "summary.json").exists() or killed:
            totals["resumes"] += 1
            done = subprocess.run(_mpts("run", "--resume", str(folder)), env=_env(), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE)
            if done.returncode != 0:
                totals["failed_resumes"] += 1
                print(done.stderr.decode()[-2000:], file=sys.stderr)
                continue
        found = compare_traces(expected, pd.read_parquet(folder / "trace.parquet"))
        for name in ("rows", "lost", "duplicated", "changed"):
            totals[name] += found[name]
    return totals


if __name__ == "__main__":
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-delay", type=float, default=2.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(kill_and_resume(Path(tmp), args.trials, args.seed, args.max_delay)))
