"""Hugging Face `generate` as a rollout backend: the fallback that needs nothing beyond transformers.

By default the backend samples from the trainer's own module (`share=True`), so a weight sync
costs nothing and every sample is on-policy by construction. `share=False` keeps a separate copy
(e.g. a bf16 inference copy next to fp32 master weights) and `sync_weights` copies into it.
"""

from __future__ import annotations

import copy

import torch

from .base import Completions, RolloutBackend, SamplingConfig, check_prompts, cut_at_eos, decode_completions


class HFBackend(RolloutBackend):
    name = "hf"

    def __init__(self, model: torch.nn.Module, tokenizer, share: bool = True, batch_prompts: int = 64,
                 autocast_dtype: torch.dtype | None = None):
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token before building the backend")
        self.model = model if share else copy.deepcopy(model).eval().requires_grad_(False)
        self.share = share
        self.tokenizer = tokenizer
        self.batch_prompts = batch_prompts
        self.autocast_dtype = autocast_dtype
        eos = model.generation_config.eos_token_id
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])

    def sync_weights(self, model: torch.nn.Module) -> None:
        if model is self.model:
            return  # shared module: already the trainer's weights
        with torch.no_grad():
            for target, source in zip(self.model.state_dict().values(), model.state_dict().values(), strict=True):
                target.copy_(source)

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingConfig, seed: int) -> Completions:
        check_prompts(prompt_ids, n)
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        token_ids: list[list[list[int]]] = []
        # A private RNG stream per call: reproducible given `seed`, and the global RNG is untouched.
        devices = [device] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                for start in range(0, len(prompt_ids), self.batch_prompts):
                    token_ids.extend(self._generate_batch(prompt_ids[start:start + self.batch_prompts], n, sampling, device))
        finally:
            self.model.train(was_training)
        texts = decode_completions(self.tokenizer, token_ids, self.eos_ids)
        return Completions(token_ids, texts)

    def _generate_batch(self, prompt_ids: list[list[int]], n: int, sampling: SamplingConfig,
                        device: torch.device) -> list[list[list[int]]]:
        width = max(len(p) for p in prompt_ids)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
        attention = torch.zeros((len(prompt_ids), width), dtype=torch.long)
        for row, ids in enumerate(prompt_ids):  # left padding: generation continues from the last column
            input_ids[row, width - len(ids):] = torch.as_tensor(ids, dtype=torch.long)
            attention[row, width - len(ids):] = 1
        options = dict(max_new_tokens=sampling.max_new_tokens, num_return_sequences=n, pad_token_id=pad,
                       eos_token_id=sorted(self.eos_ids))
        if sampling.greedy:
            options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:  # top_k=0 switches off transformers' default top-50 filter: sample from the policy itself
            options.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        with torch.autocast(device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None):
            output = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), **options)
        rows = output[:, width:].tolist()  # [prompts * n], grouped by prompt
        return [[cut_at_eos(rows[p * n + j], self.eos_ids) for j in range(n)] for p in range(len(prompt_ids))]
