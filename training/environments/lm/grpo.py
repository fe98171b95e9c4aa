"""GRPO in one file: group-normalised advantages, a clipped policy-ratio loss, optional KL.

For each prompt the policy sampled k completions o_1..o_k with rewards r_1..r_k:

    A_j        = (r_j - mean(r)) / (std(r) + eps)           one advantage per completion; 0 if all r equal
    ratio_jt   = pi(o_jt | prefix) / pi_old(o_jt | prefix)   per completion token t
    L_pg       = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A)   (asymmetric clip, DAPO)
    L_kl       = exp(ref - logp) - (ref - logp) - 1          k3 estimator of KL(pi || ref), per token
    loss       = sum over tokens (L_pg + kl_coef * L_kl) / number of completion tokens   (token mean)

One call to `GRPOTrainer.step` is one rollout batch. It is split into `updates_per_batch`
mini-batches, one AdamW step each (the clip only bites from the second one on, when pi has moved
away from pi_old); each mini-batch is processed `micro_batch_size` sequences at a time with the
gradients accumulated, so the update equals the one of the whole mini-batch at once.
On CUDA the forward passes run under bf16 autocast over fp32 master weights; on CPU in float32.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Iterator

import torch
from pydantic import ConfigDict, Field
from torch import Tensor

from mpts.models.options import StrictOptions


class GRPOConfig(StrictOptions):
    """The GRPO options, validated; also the `grpo:` section of the LM environment's config."""

    model_config = ConfigDict(**StrictOptions.model_config, arbitrary_types_allowed=True)

    lr: float = Field(1e-5, ge=0.0, description="AdamW learning rate (0 freezes the weights: tests)")
    clip_low: float = Field(0.2, ge=0.0, lt=1.0)
    clip_high: float = Field(0.28, ge=0.0)
    kl_coef: float = Field(0.0, ge=0.0, description="> 0 keeps a frozen reference copy of the initial policy")
    micro_batch_size: int = Field(64, ge=1, description="sequences per forward/backward (gradient accumulation)")
    updates_per_batch: int = Field(1, ge=1, description="optimiser steps per rollout batch")
    max_grad_norm: float = Field(1.0, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_updates: int = Field(0, ge=0, description="updates over which the learning rate ramps up linearly "
                                "(a fresh AdamW's first steps are sign-sized)")
    scale_by_std: bool = Field(True, description="False: Dr. GRPO's mean-centred advantages")
    adv_eps: float = Field(1e-6, gt=0.0)
    autocast_dtype: torch.dtype | None = Field(None, exclude=True,
                                               description="set by the environment (bf16 on CUDA), not in configs")


@dataclasses.dataclass
class Sequences:
    """The completions of one rollout batch, flattened over groups, with their advantages."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    advantages: Tensor  # float32 [n]

    def __post_init__(self) -> None:
        n = len(self.prompt_ids)
        if len(self.completion_ids) != n or self.advantages.shape != (n,):
            raise ValueError(f"sequences disagree in length: {n} prompts, {len(self.completion_ids)} completions, "
                             f"advantages of shape {tuple(self.advantages.shape)}")

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def select(self, index: list[int]) -> "Sequences":
        return Sequences([self.prompt_ids[i] for i in index], [self.completion_ids[i] for i in index],
                         self.advantages[index])

    def num_tokens(self) -> int:
        return sum(len(c) for c in self.completion_ids)


def group_advantages(rewards: Tensor, scale_by_std: bool = True, eps: float = 1e-6) -> Tensor:
    """[groups, k] rewards -> [groups, k] advantages; a group whose rewards are all equal gets exactly 0."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape [groups, k], got {tuple(rewards.shape)}")
    rewards = rewards.float()
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, unbiased=False, keepdim=True)
    advantages = centred / (std + eps) if scale_by_std else centred
    return torch.where(std > eps, advantages, torch.zeros_like(advantages))


def collate(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int, device: torch.device
            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """[left-padded prompt | right-padded completion], so every completion starts at one column.

    Returns input_ids, attention_mask, position_ids [B, P + C] and the completion mask [B, C].
    Sharing the completion columns lets the LM head run on those columns only (`logits_to_keep`).
    """
    width_p = max(len(p) for p in prompt_ids)
    width_c = max(len(c) for c in completion_ids)
    rows = len(prompt_ids)
    input_ids = torch.full((rows, width_p + width_c), pad_id, dtype=torch.long)
    attention = torch.zeros((rows, width_p + width_c), dtype=torch.long)
    for row, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        input_ids[row, width_p - len(p): width_p] = torch.as_tensor(p, dtype=torch.long)
        input_ids[row, width_p: width_p + len(c)] = torch.as_tensor(c, dtype=torch.long)
        attention[row, width_p - len(p): width_p + len(c)] = 1
    positions = (attention.cumsum(1) - 1).clamp_min(0)  # pads before the prompt sit at 0, as in generate
    completion_mask = attention[:, width_p:].bool()
    return input_ids.to(device), attention.to(device), positions.to(device), completion_mask.to(device)


def completion_logprobs(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int,
                        autocast_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """log pi(token | prefix) for every completion token: ([B, C] float32, [B, C] bool mask)."""
    device = next(model.parameters()).device
    input_ids, attention, positions, mask = collate(prompt_ids, completion_ids, pad_id, device)
    width_c = mask.shape[1]
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                       logits_to_keep=width_c + 1, use_cache=False).logits
    logits = logits[:, :-1].float()  # column j predicts completion token j
    targets = input_ids[:, -width_c:]
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return logp, mask


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_low: float,
                clip_high: float, ref_logp: Tensor | None = None, kl_coef: float = 0.0
                ) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token clipped surrogate (+ KL), summed over completion tokens (the caller divides).

    Returns the summed loss and summed diagnostics (kl, clipped tokens) for token means.
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(1)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv)
    per_token = -surrogate
    stats = {"clipped": ((ratio * adv != surrogate) & mask).sum().float().detach()}
    if ref_logp is not None:
        log_ratio_ref = ref_logp - logp
        kl = torch.exp(log_ratio_ref) - log_ratio_ref - 1.0
        per_token = per_token + kl_coef * kl
        stats["kl"] = (kl * mask).sum().detach()
    return (per_token * mask).sum(), stats


class GRPOTrainer:
    """Owns the optimiser (and the frozen reference when kl_coef > 0) for one policy."""

    def __init__(self, model: torch.nn.Module, config: GRPOConfig, pad_id: int, seed: int = 0):
        self.model = model
        self.config = config
        self.pad_id = pad_id
        self.reference = None
        if config.kl_coef > 0:
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.99),
                                           weight_decay=config.weight_decay)
        warmup = max(config.warmup_updates, 1)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda update: min(1.0, (update + 1) / warmup))
        self.generator = torch.Generator().manual_seed(seed)  # mini-batch shuffling

    def step(self, batch: Sequences) -> dict[str, float]:
        """One GRPO update on one rollout batch; returns token-mean loss, KL, grad norm, clip fraction."""
        if len(batch) == 0:
            raise ValueError("GRPO step on an empty batch")
        config = self.config
        self.model.train()
        old_logp = self._logprobs_no_grad(self.model, batch) if config.updates_per_batch > 1 else None
        ref_logp = self._logprobs_no_grad(self.reference, batch) if self.reference is not None else None
        order = torch.randperm(len(batch), generator=self.generator).tolist()
        losses, kls, norms, clipped, tokens_seen = [], [], [], 0.0, 0
        for minibatch in _split(order, config.updates_per_batch):
            total_tokens = batch.select(minibatch).num_tokens()
            # Sequences with zero advantage add exactly nothing to the policy gradient: without a
            # KL term they are skipped (they still count in the token-mean denominator).
            active = minibatch if self.reference is not None else [i for i in minibatch if batch.advantages[i] != 0]
            loss_sum, kl_sum = 0.0, 0.0
            self.optimizer.zero_grad(set_to_none=True)
            for micro in _chunks(active, config.micro_batch_size):
                part = batch.select(micro)
                logp, mask = completion_logprobs(self.model, part.prompt_ids, part.completion_ids, self.pad_id,
                                                 config.autocast_dtype)
                old = old_logp[micro][:, : logp.shape[1]] if old_logp is not None else logp.detach()
                ref = ref_logp[micro][:, : logp.shape[1]] if ref_logp is not None else None
                loss, stats = policy_loss(logp, old, part.advantages.to(logp.device), mask, config.clip_low,
                                          config.clip_high, ref, config.kl_coef)
                (loss / total_tokens).backward()
                loss_sum += float(loss.detach())
                kl_sum += float(stats.get("kl", 0.0))
                clipped += float(stats["clipped"])
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.max_grad_norm)
            if active:
                self.optimizer.step()
                self.schedule.step()
            losses.append(loss_sum / total_tokens)
            kls.append(kl_sum / total_tokens)
            norms.append(float(norm))
            tokens_seen += total_tokens
        self.model.eval()
        return {"loss": sum(losses) / len(losses),
                "kl": sum(kls) / len(kls) if self.reference is not None else float("nan"),
                "grad_norm": sum(norms) / len(norms), "clip_fraction": clipped / max(tokens_seen, 1),
                "tokens": float(tokens_seen)}

    @torch.no_grad()
    def _logprobs_no_grad(self, model, batch: Sequences) -> Tensor:
        """[n, C_max] log-probs of every sequence (padded with 0), computed in micro-batches."""
        width = max(len(c) for c in batch.completion_ids)
        out = torch.zeros((len(batch), width), device=next(model.parameters()).device)
        for micro in _chunks(list(range(len(batch))), self.config.micro_batch_size):
            part = batch.select(micro)
            logp, _ = completion_logprobs(model, part.prompt_ids, part.completion_ids, self.pad_id,
                                          self.config.autocast_dtype)
            out[micro, : logp.shape[1]] = logp
        return out

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                "generator": self.generator.get_state(),
                "reference": self.reference.state_dict() if self.reference is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.generator.set_state(state["generator"])
        if self.reference is not None and state.get("reference") is not None:
            self.reference.load_state_dict(state["reference"])


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _split(items: list[int], parts: int) -> Iterator[list[int]]:
    size = math.ceil(len(items) / parts)
    yield from (chunk for chunk in _chunks(items, size) if chunk)
