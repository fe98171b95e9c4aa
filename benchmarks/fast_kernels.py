"""Does each hand-written fast kernel pay? Its update against the library's generic strategy on the
program it declares.

`beta` (closed-form conjugate update) and `hmm3` / `hmm3_pooled` (the DPS filter) keep a fast
kernel beside their declared Pyro program; `tests/test_programs.py` checks each kernel against
streaming SVI on that program (TraceEnum_ELBO where a discrete state is enumerated), and this
script times the two on the same batch, with the settings that test needs for agreement:

    python benchmarks/fast_kernels.py                      # batch 256, pool 4000, 5 repeats
    python benchmarks/fast_kernels.py --batch 64 --svi-steps 600

Prints, per predictor: the kernel's seconds per update, SVI's, their ratio (median over repeats,
range), and how far the two posteriors' means are apart after the update.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from pyro.infer import TraceEnum_ELBO, TraceMeanField_ELBO

from mpts.inference import StreamingSVI
from mpts.models import PromptPool
from mpts.models.registry import PREDICTORS

K = 8


def build(name: str, pool: PromptPool, truth: torch.Tensor, batch: int, generator: torch.Generator):
    """A predictor with some history, and the next batch (some prompts waited, some never seen)."""
    cls = PREDICTORS.get(name)
    predictor = cls(pool, cls.Options(decay=0.8), seed=0)
    for step in (0, 2, 5):
        ids = torch.randperm(pool.size, generator=generator)[:batch]
        trials = torch.full((batch,), float(K))
        predictor.observe(ids, torch.binomial(trials, truth[ids], generator=generator), trials, step)
    ids = torch.randperm(pool.size, generator=generator)[:batch]
    trials = torch.full((batch,), float(K))
    return predictor, ids, torch.binomial(trials, truth[ids], generator=generator), trials


def one_repeat(name: str, args, seed: int) -> tuple[float, float, float]:
    generator = torch.Generator().manual_seed(seed)
    pool = PromptPool(size=args.pool, features=torch.randn(args.pool, 6, generator=generator),
                      clusters=torch.arange(args.pool) % 4)
    truth = torch.rand(args.pool, generator=generator)
    predictor, ids, successes, trials = build(name, pool, truth, args.batch, generator)
    step = 7
    program = predictor.program(ids, successes, trials, step)
    loss = (TraceEnum_ELBO(max_plate_nesting=1, num_particles=args.particles, vectorize_particles=True)
            if program.update == "filter"
            else TraceMeanField_ELBO(num_particles=args.particles, vectorize_particles=True))
    engine = StreamingSVI(program.model, program.guide, steps=args.svi_steps, lr=0.05, lr_decay=0.995, loss=loss)

    start = time.perf_counter()
    fitted, info = engine.update(engine.init(), *program.args, seed=0)
    svi_seconds = time.perf_counter() - start
    assert "failed" not in info, info
    engine.write(fitted)

    start = time.perf_counter()
    predictor.observe(ids, successes, trials, step)
    kernel_seconds = time.perf_counter() - start
    gap = (predictor.predict(ids, step + 1).mean - program.posterior(program.guide).mean).abs().max().item()
    return kernel_seconds, svi_seconds, gap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--pool", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--svi-steps", type=int, default=600, help="tests/test_programs.py's setting")
    parser.add_argument("--particles", type=int, default=16, help="tests/test_programs.py's setting")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"batch {args.batch}, pool {args.pool}, SVI {args.svi_steps} steps x {args.particles} particles, "
          f"{args.repeats} repeats")
    print(f"{'predictor':<12} {'update':<10} {'kernel s':>9} {'SVI s':>8} {'SVI / kernel':>22} {'max |mean gap|':>15}")
    for name in PREDICTORS.names():
        cls = PREDICTORS.get(name)
        probe = cls(PromptPool(size=4, features=torch.zeros(4, 6), clusters=torch.zeros(4, dtype=torch.long)),
                    seed=0).program(torch.arange(2), torch.ones(2), torch.full((2,), float(K)), 0)
        if probe.update not in {"conjugate", "filter"}:
            continue  # production is the library's SVI on the program itself: nothing to compare
        runs = [one_repeat(name, args, seed) for seed in range(args.repeats)]
        ratios = [svi / kernel for kernel, svi, _ in runs]
        print(f"{name:<12} {probe.update:<10} {statistics.median(r[0] for r in runs):>9.4f} "
              f"{statistics.median(r[1] for r in runs):>8.2f} "
              f"{statistics.median(ratios):>9.0f}x ({min(ratios):.0f}-{max(ratios):.0f}) "
              f"{max(r[2] for r in runs):>15.3f}")


if __name__ == "__main__":
    main()
