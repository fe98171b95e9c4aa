"""How one GRPO step changes the exact probability of the right answer on the prompts it trains on,
at several learning rates (the setup of tests/test_lm_env.py's one-step test: a one-layer width-64
char-level Qwen2, 150 supervised warm-up steps on one-digit sums, 40 prompts x 8 rollouts at T=0.7).

    .venv/bin/python scripts/grpo_step_probe.py [LR ...]

Prints, per learning rate: informative prompts, mean P(answer) before -> after, share of prompts that gained.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from mpts.training.environments.lm.env import LMEnvironment, LMOptions
from mpts.training.environments.lm.grpo import completion_logprobs

TINY = {"hidden_size": 64, "num_layers": 1, "num_heads": 1, "num_kv_heads": 1, "intermediate_size": 128}
TEMPERATURE = 0.7


def probe(lr: float) -> tuple[int, float, float, float]:
    options = LMOptions(num_prompts=40, eval_prompts=8, max_new_tokens=3, tiny=TINY, device="cpu",
                        task_options={"min_digits": 1, "max_digits": 1, "operators": ["+"]},
                        warmup_sft_steps=150, warmup_sft_batch=32, warmup_sft_lr=3e-3, warmup_sft_problems=64,
                        grpo={"lr": lr}, temperature=TEMPERATURE)
    with tempfile.TemporaryDirectory() as folder:
        env = LMEnvironment(options, seed=0, run_dir=Path(folder))
        out = env.rollout(torch.arange(40), 8)
        ids = out.ids[out.informative].tolist()
        prompts = [env.prompt_ids[i] for i in ids]
        answers = [env.tokenizer(env.train_problems[i].answer, add_special_tokens=False)["input_ids"]
                   + [env.tokenizer.eos_token_id] for i in ids]

        def answer_probability() -> torch.Tensor:
            with torch.no_grad():
                logp, mask = completion_logprobs(env.model, prompts, answers, env.pad_id, temperature=TEMPERATURE)
            return (logp * mask).sum(1).exp()
        before = answer_probability()
        env.train_on(out)
        after = answer_probability()
        env.close()
    return len(ids), float(before.mean()), float(after.mean()), float((after > before).float().mean())


def main(argv: list[str]) -> None:
    for lr in [float(a) for a in argv] or [3e-5, 1e-4, 3e-4, 3e-3]:
        n, before, after, gained = probe(lr)
        print(f"lr {lr:g}: {n} informative prompts, P(answer) {before:.3f} -> {after:.4f}, {gained:.0%} gained")


if __name__ == "__main__":
    main(sys.argv[1:])
