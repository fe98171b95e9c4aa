"""Per-step selection diagnostics: where a rule spends its policy updates across the pool.

The state is two tensors over the pool (the last step each prompt was trained on, and how often),
carried from step to step and saved with the checkpoint. Each step adds to `metrics.parquet`::

    recent_overlap       share of this step's trained prompts already trained in the previous
                         `window` steps (20 by default): how much a rule re-uses the same prompts
    top_decile_share     share of all updates so far that went to the 10% most-trained prompts
    greedy_solved_share  share of the rolled-out batch that greedy decoding already solved before
                         the update (LM only: an update there cannot move greedy accuracy)
    trained_accuracy     at evaluation steps: accuracy, measured as the held-out eval measures it,
                         on the prompts trained since the previous evaluation (at most
                         `probe_prompts` of them): trained vs held-out shows whether updates generalise

The same history gives the loop its optional exclusion window (`exclusion_window` in the run
config): prompts trained in the last W steps are not candidates, whatever the rule.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mpts.training.acquisition import sample_candidates

NEVER = -(2**62)  # "last trained" of a prompt never trained on


class TrainingHistory:
    """When and how often each pool prompt was trained on."""

    def __init__(self, pool_size: int, window: int = 20, probe_prompts: int = 256):
        if pool_size < 1:
            raise ValueError(f"pool_size must be >= 1, got {pool_size}")
        self.window = window
        self.probe_prompts = probe_prompts
        self.last_trained = torch.full((pool_size,), NEVER, dtype=torch.int64)
        self.counts = torch.zeros(pool_size, dtype=torch.int64)

    def recently_trained(self, step: int, within: int) -> Tensor:
        """bool [pool]: trained at one of the `within` steps before `step`."""
        return self.last_trained >= step - within

    def record(self, step: int, trained_ids: Tensor, greedy_solved: Tensor | None = None) -> dict[str, float]:
        """Add this step's trained prompts; return the step's diagnostics (computed before the update
        for the overlap, after it for the concentration)."""
        trained_ids = trained_ids.long()
        overlap = (float(self.recently_trained(step, self.window)[trained_ids].float().mean())
                   if trained_ids.numel() else float("nan"))
        self.last_trained[trained_ids] = step
        self.counts[trained_ids] += 1
        total = int(self.counts.sum())
        top = max(1, -(-self.counts.numel() // 10))  # ceil(10% of the pool)
        concentration = float(self.counts.topk(top).values.sum()) / total if total else float("nan")
        solved = (float(greedy_solved.float().mean()) if greedy_solved is not None and greedy_solved.numel()
                  else float("nan"))
        return {"recent_overlap": overlap, "top_decile_share": concentration, "greedy_solved_share": solved}

    def trained_since(self, step: int) -> Tensor:
        """Ids of prompts trained at `step` or later, most recent first, at most `probe_prompts`."""
        ids = torch.nonzero(self.last_trained >= step).squeeze(1)
        order = torch.argsort(self.last_trained[ids], descending=True, stable=True)
        return ids[order][: self.probe_prompts]

    def state_dict(self) -> dict[str, Any]:
        return {"last_trained": self.last_trained.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        last, counts = torch.as_tensor(state["last_trained"]), torch.as_tensor(state["counts"])
        if last.shape != self.last_trained.shape or counts.shape != self.counts.shape:
            raise ValueError(f"training history is for a pool of {tuple(last.shape)} prompts, "
                             f"this run has {tuple(self.last_trained.shape)}")
        self.last_trained, self.counts = last.long().clone(), counts.long().clone()


def trained_accuracy(history: TrainingHistory, env, since_step: int) -> float:
    """Mean accuracy of the current policy on prompts trained since `since_step`; NaN when none were
    or the environment cannot measure pool prompts."""
    ids = history.trained_since(since_step)
    if ids.numel() == 0:
        return float("nan")
    accuracy = env.accuracy_on(ids)
    return float(accuracy.float().mean()) if accuracy is not None else float("nan")


def eligible_candidates(history: TrainingHistory, step: int, exclusion_window: int, num_candidates: int,
                        generator: torch.Generator) -> Tensor:
    """Candidate ids drawn uniformly from the prompts not trained in the last `exclusion_window` steps."""
    eligible = torch.nonzero(~history.recently_trained(step, exclusion_window)).squeeze(1)
    if eligible.numel() < num_candidates:
        raise ValueError(f"exclusion_window={exclusion_window}: only {eligible.numel()} prompts were not trained "
                         f"in the last {exclusion_window} steps, fewer than the {num_candidates} candidates per step")
    return eligible[sample_candidates(eligible.numel(), num_candidates, generator)]
