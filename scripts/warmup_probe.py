"""What the supervised warm-up leaves: held-out accuracy of a config's starting policy, before any GRPO.

Builds the LM environment of a named config (default `lm_tiny`) with `--set` overrides, which runs
the warm-up (or reuses it from `env.warmup_cache`), then prints held-out greedy and sampled accuracy,
the share of greedy answers that are the task's flawed answer (arithmetic: the leading-zero slip),
and greedy accuracy by carry count.

    .venv/bin/python scripts/warmup_probe.py [--config lm_tiny] [--seed 0] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
from pathlib import Path

from mpts.training.config import load_config
from mpts.training.environments.lm.env import LMEnvironment, LMOptions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="lm_tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
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
        try:
            slipped = sum(a == env.task.flawed_answer(p) for a, p in zip(answers, env.eval_problems)) / len(answers)
        except ValueError:
            slipped = float("nan")
        by_carries = collections.defaultdict(list)
        for answer, problem in zip(answers, env.eval_problems):
            by_carries[problem.meta.get("carries", problem.difficulty)].append(env.task.reward(answer, problem))
        env.close()
    print(f"held-out ({len(answers)} problems): greedy {metrics['eval_accuracy_greedy']:.3f}, sampled "
          f"{metrics.get('eval_accuracy_sampled', float('nan')):.3f}, greedy answer = flawed answer {slipped:.3f}")
    for carries, rewards in sorted(by_carries.items()):
        print(f"  carries {carries}: {len(rewards)} problems, greedy {sum(rewards) / len(rewards):.3f}")


if __name__ == "__main__":
    main()
