"""Seconds per optimiser step of `SelectiveGRPOTrainer` against plain `trl.GRPOTrainer`, on the tiny
CPU configuration of tests/trl_harness.py (a character-level Qwen2 built from a config).

    nice -n 10 python benchmarks/trl_overhead.py                     # 5 repeats x 24 steps per trainer
    nice -n 10 python benchmarks/trl_overhead.py --repeats 7 --steps 40

Both trainers run in this process, alternating (plain, selective, plain, ...), each repeat with a
fresh trainer and the same seed, so drift in the machine's load falls on both. A step's time is
the wall time between TRL's `on_train_begin` and `on_train_end` divided by the steps (trainer
construction, which loads nothing here, is outside). Checkpoints are off for both; the selective
trainer writes its run folder as it does in any run. Prints one JSON line per repeat, then the
median ratio, the range of the per-repeat ratios, and the ratio of each trainer's fastest repeat.
To compare with an older commit, run the same file there (e.g. a `git worktree` of it on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback


def parity(prompts, completions, **_):
    return [float(len(c) > 0 and ord(c[0]) % 2 == 0) for c in completions]


def bonus(prompts, completions, **_):
    return [0.5 * float(len(c) > 1 and ord(c[1]) % 3 == 0) for c in completions]


class Clock(TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        self.begin = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        self.seconds = time.perf_counter() - self.begin


def make_trainer(kind: str, out: Path, steps: int, prompts: int):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from mpts.integrations.trl import SelectiveGRPOTrainer
    from mpts.training.environments.lm.tiny_lm import TinyModelOptions, build_char_tokenizer, build_tiny_model

    tokenizer = build_char_tokenizer()
    model = build_tiny_model(tokenizer, TinyModelOptions(hidden_size=64, num_layers=1, intermediate_size=128,
                                                         max_positions=64), seed=0)
    dataset = Dataset.from_dict({"prompt": [f"{i} + {i % 7} = " for i in range(prompts)]})
    args = GRPOConfig(output_dir=str(out), use_cpu=True, bf16=False, report_to=[], seed=3,
                      per_device_train_batch_size=4, num_generations=4, max_completion_length=3,
                      gradient_accumulation_steps=2, steps_per_generation=4, max_steps=steps, learning_rate=1e-3,
                      logging_strategy="no", save_strategy="no", temperature=1.0, dataloader_num_workers=0,
                      disable_tqdm=True)
    common = dict(model=model, reward_funcs=[parity, bonus], args=args, train_dataset=dataset,
                  processing_class=tokenizer)
    if kind == "plain":
        return GRPOTrainer(**common)
    return SelectiveGRPOTrainer(**common, selection={"candidate_ratio": 3.0})


def seconds_per_step(kind: str, steps: int, prompts: int) -> float:
    with tempfile.TemporaryDirectory(prefix=f"mpts-trl-{kind}-") as out:
        trainer = make_trainer(kind, Path(out), steps, prompts)
        clock = Clock()
        trainer.add_callback(clock)
        trainer.train()
        return clock.seconds / steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=24, help="optimiser steps per trainer and repeat")
    parser.add_argument("--prompts", type=int, default=200, help="dataset size")
    options = parser.parse_args(argv)
    torch.set_num_threads(1)
    seconds_per_step("plain", 2, options.prompts)  # warm-up: imports, first kernels
    seconds_per_step("selective", 2, options.prompts)
    ratios, plains, selectives = [], [], []
    for repeat in range(options.repeats):
        plain = seconds_per_step("plain", options.steps, options.prompts)
        selective = seconds_per_step("selective", options.steps, options.prompts)
        ratios.append(selective / plain)
        plains.append(plain)
        selectives.append(selective)
        print(json.dumps({"repeat": repeat, "plain_s_per_step": round(plain, 4),
                          "selective_s_per_step": round(selective, 4), "ratio": round(ratios[-1], 3)}), flush=True)
    # the fastest repeat of each trainer is the one least disturbed by other load on the machine
    print(json.dumps({"median_ratio": round(statistics.median(ratios), 3), "min_ratio": round(min(ratios), 3),
                      "max_ratio": round(max(ratios), 3), "ratio_of_fastest": round(min(selectives) / min(plains), 3), "repeats": options.repeats, "steps": options.steps,
                      "python": sys.version.split()[0]}))


if __name__ == "__main__":
    main()
