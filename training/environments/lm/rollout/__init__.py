"""Rollout backends: Hugging Face `generate` (always available) and vLLM's offline engine."""

from .base import Completions, RolloutBackend, SamplingConfig

__all__ = ["Completions", "RolloutBackend", "SamplingConfig", "make_backend"]


def make_backend(name: str, **kwargs) -> RolloutBackend:
    """`hf` or `vllm`; vLLM is imported only when asked for."""
    if name == "hf":
        from .hf import HFBackend
        return HFBackend(**kwargs)
    if name == "vllm":
        from .vllm_backend import VLLMBackend
        return VLLMBackend(**kwargs)
    raise ValueError(f"unknown rollout backend {name!r}; known: hf, vllm")
