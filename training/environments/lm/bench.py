"""Cost of one weight sync and of one rollout batch, per rollout backend.

    python -m mpts.training.environments.lm.bench [--hidden 128 --layers 2] [--backends hf hf_copy vllm] [--json]

Builds a randomly initialised Qwen2 with the character tokenizer (nothing is downloaded), then
for each backend: the median seconds of `sync_weights` (trainer weights -> engine) and of one
`generate` of prompts x k samples. `hf` shares the trainer's module (a sync is a no-op), `hf_copy`
keeps its own copy (a sync is a state-dict copy), `vllm` reloads the weights into the in-process
engine. Backends that cannot start here (vllm not installed) are reported as such. Prints
figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from typing import Any

import torch

from mpts.training.environments.lm.rollout import SamplingConfig, make_backend
from mpts.training.environments.lm.rollout.vllm_backend import vllm_available
from mpts.training.environments.lm.tiny_lm import TinyModelOptions, build_char_tokenizer, build_tiny_model, save_model


def bench_backends(hidden: int = 128, layers: int = 2, backends: tuple[str, ...] = ("hf", "hf_copy", "vllm"),
                   prompts: int = 64, k: int = 8, max_new_tokens: int = 8, repeats: int = 5, seed: int = 0
                   ) -> dict[str, Any]:
    tokenizer = build_char_tokenizer()
    shape = TinyModelOptions(hidden_size=hidden, num_layers=layers, num_heads=max(1, hidden // 64),
                             num_kv_heads=max(1, hidden // 64), intermediate_size=4 * hidden)
    model = build_tiny_model(tokenizer, shape, seed).eval()
    params = sum(p.numel() for p in model.parameters())
    prompt_ids = [tokenizer(f"{i}+{i * 7 % 100}=", add_special_tokens=False)["input_ids"] for i in range(prompts)]
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0)
    results: dict[str, Any] = {"parameters": params, "weight_mib": params * 4 / 2**20, "prompts": prompts, "k": k,
                               "max_new_tokens": max_new_tokens, "backends": {}}
    with tempfile.TemporaryDirectory() as directory:
        save_model(model, tokenizer, directory)
        for name in backends:
            if name == "vllm" and not vllm_available():
                results["backends"][name] = {"skipped": "vllm is not importable"}
                continue
            start = time.perf_counter()
            if name == "vllm":
                backend = make_backend("vllm", model_dir=directory, tokenizer=tokenizer, dtype="float32",
                                       max_model_len=256, seed=seed)
            else:
                backend = make_backend("hf", model=model, tokenizer=tokenizer, share=(name == "hf"))
            startup = time.perf_counter() - start
            syncs, generations = [], []
            for repeat in range(repeats + 1):  # the first round warms caches and is not counted
                with torch.no_grad():
                    model.model.norm.weight.mul_(1.0001)  # a "training step": the weights change
                start = time.perf_counter()
                backend.sync_weights(model)
                sync = time.perf_counter() - start
                start = time.perf_counter()
                backend.generate(prompt_ids, k, sampling, seed=repeat)
                generate = time.perf_counter() - start
                if repeat:
                    syncs.append(sync)
                    generations.append(generate)
            backend.close()
            results["backends"][name] = {
                "startup_seconds": startup, "sync_seconds": statistics.median(syncs),
                "generate_seconds": statistics.median(generations),
                "samples_per_second": prompts * k / statistics.median(generations),
            }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--backends", nargs="+", default=["hf", "hf_copy", "vllm"])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = bench_backends(args.hidden, args.layers, tuple(args.backends), args.prompts, args.k,
                            args.max_new_tokens, args.repeats)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"model: {result['parameters']:,} parameters ({result['weight_mib']:.1f} MiB fp32); "
          f"{args.prompts} prompts x {args.k} samples x {args.max_new_tokens} tokens")
    for name, row in result["backends"].items():
        if "skipped" in row:
            print(f"  {name:8s} skipped: {row['skipped']}")
        else:
            print(f"  {name:8s} startup {row['startup_seconds']:7.2f} s   sync {row['sync_seconds'] * 1e3:8.2f} ms   "
                  f"generate {row['generate_seconds']:6.2f} s   ({row['samples_per_second']:.0f} samples/s)")
    return 0


if __name__ == "__main__":  # vLLM may spawn processes: keep the entry point guarded
    raise SystemExit(main())
