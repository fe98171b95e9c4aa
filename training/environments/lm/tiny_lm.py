"""A tiny causal LM for CPU runs: a character-level tokenizer, a 2-layer Qwen2, a supervised warm-up.

Everything is built locally (nothing is downloaded) and saved with `save_pretrained`, so the
directory loads in Hugging Face `transformers` and in vLLM like any other checkpoint.
The warm-up teaches the format and part of the task, so that per-prompt success rates start
neither all 0 nor all 1 and GRPO has something to move.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from pydantic import Field

from mpts.models.extras import import_extra

import_extra("transformers", "lm")
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer  # noqa: E402

from mpts.models.options import StrictOptions  # noqa: E402

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)


def byte_symbols() -> list[str]:
    """GPT-2's byte -> printable-character table (byte order): space is 'Ġ', newline 'Ċ'."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


class TinyModelOptions(StrictOptions):
    """Shape of the tiny Qwen2. vLLM's CPU attention wants head_dim 64 (16 was refused)."""

    hidden_size: int = Field(128, ge=64)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(2, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(512, ge=1)
    max_positions: int = Field(512, ge=16)

    def model_post_init(self, _context) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"tiny.hidden_size={self.hidden_size} must be divisible by tiny.num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"tiny.num_heads={self.num_heads} must be a multiple of tiny.num_kv_heads={self.num_kv_heads}")


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte (so per ASCII character), special tokens first.

    Built as Qwen2's own tokenizer class (byte-level BPE) with an empty merge list: that is the
    class `AutoTokenizer` and vLLM pick for a Qwen2 directory, so a saved copy reloads with exactly
    the same ids everywhere (a plain WordLevel tokenizer would be rebuilt as Qwen2's and lose spaces).
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for symbol in byte_symbols():
        vocab[symbol] = len(vocab)
    return Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=UNK, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                          padding_side="left", model_max_length=TinyModelOptions().max_positions)


def build_tiny_model(tokenizer: PreTrainedTokenizerFast, options: TinyModelOptions, seed: int) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2 sized by `options`, deterministic given `seed`."""
    # Exactly one row per token: padding rows (rounded up for matmul shapes) would be sampled as ids
    # that decode to no text at all, so "8<row 300>1" would read as "81".
    vocab_size = len(tokenizer)
    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=options.hidden_size, intermediate_size=options.intermediate_size,
        num_hidden_layers=options.num_layers, num_attention_heads=options.num_heads,
        num_key_value_heads=options.num_kv_heads, max_position_embeddings=options.max_positions,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, use_cache=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def save_model(model, tokenizer, directory: Path) -> Path:
    """Weights (safetensors), config and tokenizer in one directory HF and vLLM can load."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def supervised_warmup(model, tokenizer, prompts: Sequence[str], targets: Sequence[str], steps: int,
                      batch_size: int, lr: float, seed: int, device: torch.device,
                      flawed_targets: Sequence[str] | None = None,
                      flaw_rate: float | Sequence[float] = 0.0) -> list[float]:
    """Teacher-forced cross-entropy on the target completions (prompt tokens are not scored).

    With `flawed_targets`, each drawn example is taught its flawed target with probability
    `flaw_rate` (a teacher that makes a systematic slip that often), so the warmed-up policy knows
    the right answer but gives it only part of the time: the situation RL with a verifier fixes.
    `flaw_rate` may also be one rate per example (a slip that depends on the problem, e.g. its level).
    Returns the loss of each step. Mini-batches and slips are deterministic given `seed`.
    """
    if len(prompts) != len(targets) or not prompts:
        raise ValueError(f"warm-up needs as many targets as prompts (got {len(prompts)} prompts, {len(targets)} targets)")
    if flawed_targets is not None and len(flawed_targets) != len(targets):
        raise ValueError(f"warm-up needs one flawed target per target (got {len(flawed_targets)} for {len(targets)})")
    rates = torch.as_tensor(flaw_rate, dtype=torch.float32)  # the dtype a single rate was always compared in
    if rates.dim() > 1 or (rates.dim() == 1 and len(rates) != len(targets)):
        raise ValueError(f"flaw_rate must be one rate or one per target (got shape {tuple(rates.shape)} for {len(targets)})")
    if not bool(((rates >= 0.0) & (rates <= 1.0)).all()):
        raise ValueError(f"flaw_rate must be in [0, 1], got {flaw_rate}")

    def encode(texts: Sequence[str]) -> list[list[int]]:
        return [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    target_ids = encode(targets)
    flawed_ids = encode(flawed_targets) if flawed_targets is not None else target_ids
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 1 - s / max(steps, 1)))
    model.train()
    losses = []
    for _ in range(steps):
        picks = torch.randint(len(prompts), (batch_size,), generator=generator).tolist()
        # drawn only with a flawed teacher, so a clean warm-up sees the mini-batches it always saw
        # one draw per example whatever the rates, so a single rate gives the slips it always gave
        slips = ((torch.rand(batch_size, generator=generator)
                  < (rates[picks] if rates.dim() else rates)).tolist() if flawed_targets is not None
                 else [False] * batch_size)
        completions = [flawed_ids[i] if slip else target_ids[i] for i, slip in zip(picks, slips)]
        input_ids, attention_mask, scored = pad_right([prompt_ids[i] + c for i, c in zip(picks, completions)],
                                                      [len(prompt_ids[i]) for i in picks], tokenizer.pad_token_id)
        labels = input_ids.masked_fill(~scored, -100)
        loss = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                     labels=labels.to(device)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def pad_right(sequences: list[list[int]], prompt_lengths: list[int], pad_id: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded token ids [B, T], attention mask [B, T] and a bool mask of completion tokens."""
    lengths = torch.tensor([len(s) for s in sequences])
    starts = torch.tensor(prompt_lengths)
    flat = torch.tensor([t for s in sequences for t in s], dtype=torch.long)
    positions = torch.arange(int(lengths.max()))
    attention_mask = positions.unsqueeze(0) < lengths.unsqueeze(1)
    input_ids = torch.full(attention_mask.shape, pad_id, dtype=torch.long)
    input_ids[attention_mask] = flat  # row-major fill matches the concatenation order
    completion = attention_mask & (positions.unsqueeze(0) >= starts.unsqueeze(1))
    return input_ids, attention_mask.long(), completion
