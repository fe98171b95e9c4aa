"""The rollout-backend seam: sample completions from the current policy, take new weights.

Backends work on token ids, not text: the environment tokenizes each prompt once, the backend
samples completion ids, and the trainer scores exactly those ids. Texts come along for the verifier:
everything before the end-of-sequence token, special tokens included, so a sampled token with no
text of its own (a pad or BOS in mid-answer) stays visible to the verifier instead of vanishing.
"""

from __future__ import annotations

import abc
import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclasses.dataclass
class Completions:
    """n completions per prompt: token_ids[prompt][sample] (ending with EOS when the model stopped)."""

    token_ids: list[list[list[int]]]
    texts: list[list[str]]


class RolloutBackend(abc.ABC):
    """Generates from a copy of (or a view on) the trainer's policy."""

    name: str

    @abc.abstractmethod
    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingConfig, seed: int) -> Completions:
        """n samples per prompt; the same seed gives the same completions for the same weights."""

    @abc.abstractmethod
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the next generate() sample from `model`'s current weights."""

    def close(self) -> None:
        """Release the engine (processes, memory)."""


def check_prompts(prompt_ids: list[list[int]], n: int) -> None:
    if n < 1:
        raise ValueError(f"n (samples per prompt) must be >= 1, got {n}")
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token (got an empty prompt list or an empty prompt)")


def decode_completions(tokenizer, token_ids: list[list[list[int]]], eos_ids: set[int]) -> list[list[str]]:
    """texts[prompt][sample]: the tokens before the first EOS, decoded with special tokens kept."""
    def before_eos(ids: list[int]) -> list[int]:
        cut = cut_at_eos(ids, eos_ids)
        return cut[:-1] if cut and cut[-1] in eos_ids else cut
    return [tokenizer.batch_decode([before_eos(ids) for ids in samples], skip_special_tokens=False)
            for samples in token_ids]


def cut_at_eos(ids: list[int], eos_ids: set[int]) -> list[int]:
    """Keep tokens up to and including the first EOS (what follows it is padding)."""
    for position, token in enumerate(ids):
        if token in eos_ids:
            return ids[: position + 1]
    return ids
