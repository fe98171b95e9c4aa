"""`mpts bench` of several checkouts (e.g. an older commit and this one), interleaved, in one run:
prints, per predictor and checkout, the ratio of its median ms per step to the first checkout's
(median and range over repeats).

    git worktree add --detach /tmp/mpts-base 74470e7
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/bench_versus.py /tmp/mpts-base . --repeats 7 [--clock cpu]

Each measurement is a fresh `mpts bench --json` process (same interpreter, flags and
environment); within a repeat the checkouts run back to back in an order that rotates, so load on
a shared machine weighs on all alike. A checkout is imported as `mpts` through a temporary folder
holding a link named `mpts`, put first on PYTHONPATH. A checkout that is a live working tree is
read as it is at each start: do not edit it during the run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = "import sys; from mpts.training.cli import main; sys.argv[0] = 'mpts'; sys.exit(main())"
# --clock cpu: the bench's timer reads this process's CPU time instead of the wall clock, so other
# work on a busy machine (which stretches wall time, not CPU time) hardly moves the figures
CPU_CLOCK = "import time; time.perf_counter = time.process_time; "


def one_bench(link_dir: Path, predictor: str, flags: list[str], clock: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(link_dir), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    code = (CPU_CLOCK if clock == "cpu" else "") + BENCH
    done = subprocess.run([sys.executable, "-c", code, "bench", "--predictor", predictor, "--json", *flags],
                          env=env, cwd=link_dir, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{link_dir / 'mpts'}: mpts bench --predictor {predictor} failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["median_ms_per_step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkouts", nargs="+", type=Path, help="mpts checkouts; ratios are against the first")
    parser.add_argument("--predictors", nargs="+", default=["beta", "hmm3", "id_vae", "gp"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: as `mpts bench` reports; cpu: the process's CPU time (steadier on a busy machine)")
    parser.add_argument("--flag", action="append", default=[], help="extra `mpts bench` flag, e.g. --flag=--pool=100000")
    args = parser.parse_args()
    trees = [tree.resolve() for tree in args.checkouts]
    for given, tree in zip(args.checkouts, trees):
        if not (tree / "training" / "bench.py").is_file():
            sys.exit(f"{given}: not an mpts checkout (no training/bench.py)")
    if len(trees) < 2:
        sys.exit("name at least two checkouts (the first is the reference)")
    names = [str(tree) for tree in trees]
    flags = ["--steps", str(args.steps), *args.flag]
    times = {p: {name: [] for name in names} for p in args.predictors}
    with tempfile.TemporaryDirectory() as scratch:
        links = []
        for number, tree in enumerate(trees):
            link_dir = Path(scratch) / str(number)
            link_dir.mkdir()
            (link_dir / "mpts").symlink_to(tree)
            links.append(link_dir)
        for repeat in range(args.repeats):
            shift = repeat % len(trees)
            order = list(range(len(trees)))[shift:] + list(range(len(trees)))[:shift]
            for predictor in args.predictors:
                for number in order:
                    times[predictor][names[number]].append(one_bench(links[number], predictor, flags, args.clock))
            print(json.dumps({"repeat": repeat, **{p: [round(t[n][-1], 2) for n in names] for p, t in times.items()}}),
                  flush=True)
    for predictor, by_tree in times.items():
        reference = by_tree[names[0]]
        for name in names[1:]:
            ratios = [mine / ref for mine, ref in zip(by_tree[name], reference)]
            print(json.dumps({"predictor": predictor, "clock": args.clock, "checkout": name, "reference": names[0],
                              "reference_ms": round(statistics.median(reference), 2),
                              "ms": round(statistics.median(by_tree[name]), 2),
                              "ratio": round(statistics.median(ratios), 3), "ratio_min": round(min(ratios), 3),
                              "ratio_max": round(max(ratios), 3), "repeats": len(ratios)}))


if __name__ == "__main__":
    main()
