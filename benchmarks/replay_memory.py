"""Peak memory of `mpts replay` on a large per-rollout log (issue 21, item 7).

Writes a CSV log (step, prompt_id, successes, trials) with `--ids` distinct prompt ids, each
rolled out `--rollouts` times (one row per rollout) at one of `--steps` steps, streamed to disk
block by block (the generator never holds the log), then runs `mpts replay LOG --predictor beta`
in a child process and prints the child's peak RSS (resource.getrusage(RUSAGE_CHILDREN)) and its
wall time, next to the peak of the same command on a 10-id log (the interpreter and libraries)
and what replay's up-front memory check estimates beyond that (`replay_stream.stream_need`).
The default is the issue's case: 10^7 ids, about 1.1 GB. The logs are deleted after.

    nice -n 19 .venv/bin/python benchmarks/replay_memory.py              # 10^7 ids
    .venv/bin/python benchmarks/replay_memory.py --ids 1000000 --mpts /path/to/other/mpts
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

ID_STRIDE, ID_OFFSET = 7919, 13  # distinct, sparse ids: labels, not row numbers


def write_log(path: Path, ids: int, rollouts: int, steps: int, seed: int = 0) -> None:
    generator = np.random.default_rng(seed)
    per_step = -(-ids // steps)
    schema = pa.schema([("step", pa.int64()), ("prompt_id", pa.int64()), ("successes", pa.int64()),
                        ("trials", pa.int64())])
    with pacsv.CSVWriter(str(path), schema, write_options=pacsv.WriteOptions(quoting_style="none")) as writer:
        for step in range(steps):
            first, last = step * per_step, min(ids, (step + 1) * per_step)
            if first >= last:
                break
            prompt = np.repeat(np.arange(first, last, dtype=np.int64) * ID_STRIDE + ID_OFFSET, rollouts)
            p = generator.beta(1.0, 1.5, last - first).repeat(rollouts)
            successes = (generator.random(len(prompt)) < p).astype(np.int64)
            writer.write_table(pa.table({"step": np.full(len(prompt), step, np.int64), "prompt_id": prompt,
                                         "successes": successes, "trials": np.ones(len(prompt), np.int64)},
                                        schema=schema))


def estimate(ids: int, rollouts: int) -> int:
    """What replay's memory check counts for this log (integer ids, one scored row per id)."""
    from mpts.models.registry import get_predictor_class
    from mpts.training.memory import predictor_state_bytes
    from mpts.training.replay_stream import DEFAULT_CHUNK_ROWS, label_bytes, stream_need

    beta = get_predictor_class("beta")
    return stream_need(predictor_state_bytes(beta, beta.Options(), ids, 0), label_bytes(ids, np.empty(0, object)),
                       ids, min(DEFAULT_CHUNK_ROWS, ids * rollouts)).total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=10**7)
    parser.add_argument("--rollouts", type=int, default=6, help="rows (rollouts) per prompt")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--mpts", default=str(Path(sys.executable).with_name("mpts")),
                        help="the mpts command to measure (e.g. another checkout's, for a before/after)")
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()

    handle, name = tempfile.mkstemp(suffix=".csv", prefix="replay-memory-", dir=args.dir)
    os.close(handle)
    log = Path(name)
    try:
        write_log(log, 10, args.rollouts, 1)  # the children's peak is a maximum: the small one first
        subprocess.run([args.mpts, "replay", str(log), "--predictor", "beta"], capture_output=True, check=True)
        baseline = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        start = time.perf_counter()
        write_log(log, args.ids, args.rollouts, args.steps)
        size = log.stat().st_size
        print(f"log: {log} {size / 1e9:.2f} GB, {args.ids} ids x {args.rollouts} rollouts over {args.steps} steps "
              f"(written in {time.perf_counter() - start:.0f} s)", flush=True)
        start = time.perf_counter()
        done = subprocess.run([args.mpts, "replay", str(log), "--predictor", "beta"], capture_output=True, text=True)
        seconds = time.perf_counter() - start
    finally:
        log.unlink(missing_ok=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB
    print(f"mpts replay --predictor beta: exit {done.returncode}, peak RSS {peak / 2**30:.2f} GiB, "
          f"{seconds:.0f} s ({args.mpts})")
    print(f"  on a 10-id log: {baseline / 2**30:.2f} GiB; the difference {(peak - baseline) / 2**30:.2f} GiB; "
          f"the up-front check's estimate {estimate(args.ids, args.rollouts) / 2**30:.2f} GiB")
    print((done.stdout if done.returncode == 0 else done.stderr).strip()[-2000:])
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
