"""What the supervised warm-up leaves: held-out accuracy of a config's starting policy, before any GRPO.

Builds the LM environment of a named config (default `lm_tiny`) with `--set` overrides, which runs
the warm-up (or reuses it from `env.warmup_cache`), then prints held-out greedy and sampled accuracy,
the share of greedy answers that are the task's flawed answer (arithmetic: the leading-zero slip),
greedy accuracy by carry count, and by difficulty level (the pool's clusters): greedy accuracy,
sampled accuracy over `--samples` samples per problem, and the shares of problems solved by none,
all, or some of those samples (with k = --samples, the groups GRPO would get no signal from).

    .venv/bin/python scripts/warmup_probe.py [--config lm_tiny] [--seed 0] [--samples 8] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
from pathlib import Path

import torch

from mpts.training.config import load_config
from mpts.training.environments.lm.env import LMEnvironment, LMOptions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="lm_tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=8, help="samples per problem for the by-level solve rates")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    if args.samples < 1:
        parser.error(f"--samples must be >= 1, got {args.samples}")
    config = load_config(args.config, [f"env.{o}" if not o.startswith("env.") else o for o in args.overrides])
    options = config.env.model_dump()
    options.pop("name")
    with tempfile.TemporaryDirectory(prefix="mpts-warmup-probe-") as folder:
        start = time.perf_counter()
        env = LMEnvironment(LMOptions.model_validate(options), seed=args.seed, run_dir=Path(folder) / "run")
        print(f"warm-up ready in {time.perf_counter() - start:.0f} s")
        metrics = env.evaluate_metrics()
        completions, _ = env._generate_isolated(env.eval_prompt_ids, 1, env.greedy_sampling, 0)
        answers = [texts[0].strip() for texts in completions.texts]
        try:  # a slipped answer has the arithmetic right: what GRPO can still turn into a solve
            slips = torch.tensor([float(a == env.task.flawed_answer(p)) for a, p in zip(answers, env.eval_problems)])
        except ValueError:
            slips = torch.full((len(answers),), float("nan"))
        slipped = float(slips.mean())
        by_carries = collections.defaultdict(list)
        for answer, problem in zip(answers, env.eval_problems):
            by_carries[problem.meta.get("carries", problem.difficulty)].append(env.task.reward(answer, problem))
        greedy = torch.tensor([env.task.reward(a, p) for a, p in zip(answers, env.eval_problems)])
        sampled = env._solve_rate(env.eval_prompt_ids, env.eval_problems, args.samples, env.sampling, 1)
        levels = torch.tensor([p.difficulty for p in env.eval_problems])
        env.close()
    print(f"held-out ({len(answers)} problems): greedy {metrics['eval_accuracy_greedy']:.3f}, sampled "
          f"{metrics.get('eval_accuracy_sampled', float('nan')):.3f}, greedy answer = flawed answer {slipped:.3f}")
    for carries, rewards in sorted(by_carries.items()):
        print(f"  carries {carries}: {len(rewards)} problems, greedy {sum(rewards) / len(rewards):.3f}")
    print(level_table(levels, greedy, sampled, args.samples, slips))


def level_table(levels: torch.Tensor, greedy: torch.Tensor, sampled: torch.Tensor, k: int, slips: torch.Tensor) -> str:
    """Markdown table by level: greedy and sampled accuracy, shares solved by 0 of k, k of k, in between,
    and the share whose greedy answer is the slip (right arithmetic, wrong form)."""
    lines = [f"| level | problems | greedy | sampled (k={k}) | 0/{k} | {k}/{k} | 0<s<{k} | greedy = slip |",
             "|---|---|---|---|---|---|---|---|"]
    for level in [*torch.unique(levels).tolist(), "all"]:
        rows = torch.ones_like(levels, dtype=torch.bool) if level == "all" else levels == level
        rate = sampled[rows]
        none, every = float((rate == 0).float().mean()), float((rate == 1).float().mean())
        lines.append(f"| {level} | {int(rows.sum())} | {float(greedy[rows].mean()):.3f} | {float(rate.mean()):.3f} "
                     f"| {none:.3f} | {every:.3f} | {1 - none - every:.3f} | {float(slips[rows].mean()):.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
