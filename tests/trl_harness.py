"""A tiny TRL GRPO run for the adapter's tests (imported by test_trl.py, run by torchrun for 2 ranks).

The policy is the tiny character-level Qwen2 of `tiny_lm`, built from a config (nothing is
downloaded). Rewards do not need a trained model: `parity` pays 1 when the completion's first
character has an even code and `bonus` pays 0.5 when the second one's code is a multiple of 3, so
success rates differ by prompt
and the summed reward is not binary. Every call of the reward functions is logged (which prompt
ids, which rewards), so the test can check that the prompts generated for are the ones selected.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

CALLS: list[dict] = []
UNSCORED: set[int] = set()  # prompt ids no reward function can score (both return None)
INFINITE: set[int] = set()  # prompt ids `parity` scores +inf (a broken reward function)


def parity(prompts, completions, idx, **_):
    rewards = [None if i in UNSCORED else float("inf") if i in INFINITE else float(len(c) > 0 and ord(c[0]) % 2 == 0)
               for c, i in zip(completions, idx)]
    CALLS.append({"idx": list(map(int, idx)), "parity": rewards})
    return rewards


def bonus(prompts, completions, idx, **_):
    rewards = [None if i in UNSCORED else 0.5 * float(len(c) > 1 and ord(c[1]) % 3 == 0)
               for c, i in zip(completions, idx)]
    CALLS[-1]["bonus"] = rewards
    return rewards


def make_trainer(out_dir: Path, *, prompts: int = 24, selection: dict | None = None, **config):
    from datasets import Dataset
    from trl import GRPOConfig

    from mpts.integrations.trl import SelectiveGRPOTrainer
    from mpts.training.environments.lm.tiny_lm import TinyModelOptions, build_char_tokenizer, build_tiny_model

    tokenizer = build_char_tokenizer()
    model = build_tiny_model(tokenizer, TinyModelOptions(hidden_size=64, num_layers=1, intermediate_size=128,
                                                         max_positions=64), seed=0)
    dataset = Dataset.from_dict({"prompt": [f"{i} + {i % 7} = " for i in range(prompts)], "idx": list(range(prompts))})
    settings = dict(output_dir=str(out_dir), use_cpu=True, bf16=False, report_to=[], seed=3,
                    per_device_train_batch_size=4, num_generations=4, max_completion_length=3,
                    gradient_accumulation_steps=2, steps_per_generation=4, max_steps=6, learning_rate=1e-3,
                    logging_steps=1, save_strategy="steps", save_steps=2, temperature=1.0, dataloader_num_workers=0)
    args = GRPOConfig(**{**settings, **config})
    return SelectiveGRPOTrainer(model=model, reward_funcs=[parity, bonus], args=args, train_dataset=dataset,
                                processing_class=tokenizer, selection={"candidate_ratio": 3.0, **(selection or {})})


if __name__ == "__main__":  # torchrun --nproc_per_node 2 trl_harness.py OUT
    out = Path(sys.argv[1])
    trainer = make_trainer(out, max_steps=4)
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    (out / f"calls-{rank}.json").write_text(json.dumps(CALLS))
    torch.save(trainer.selector.state_dict(), out / f"selector-{rank}.pt")
