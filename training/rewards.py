"""Rewards a trainer hands over that cannot count as outcomes: missing (None, which TRL turns into
NaN) or non-finite. The adapters share one rule, so a broken reward function is never silent.

A rollout's reward is usable when at least one reward function scored it with a finite value and
none returned +-inf (TRL's multi-task convention: a function returns None for samples it does not
apply to, and another one scores them). Unusable rollouts are not trials; they are counted per
step (`nonfinite_rewards` in the metrics) and a `RewardWarning` names the functions that returned
them. A step with no usable reward at all is an error (`missing_rewards="error"`, the default),
or, with `missing_rewards="skip"`, recorded with every prompt failed and nothing observed.
"""

from __future__ import annotations

import warnings
from typing import Literal, Sequence

import numpy as np

MissingRewards = Literal["error", "skip"]


class RewardWarning(UserWarning):
    """Some rollouts of a step had no usable reward."""


class NoUsableRewardError(ValueError):
    """No rollout of a step had a usable reward (and the policy is "error")."""


def usable_rewards(per_function: np.ndarray, names: Sequence[str], step: int, policy: MissingRewards,
                   option: str) -> np.ndarray:
    """Which rollouts have a usable reward: `per_function` is [rollouts, reward functions] (NaN
    where a function returned None). Warns naming the functions when some have none; raises
    `NoUsableRewardError` when none has one and `policy` is "error" (`option` names the setting
    that changes the policy, e.g. `selection={'missing_rewards': 'skip'}`)."""
    values = np.asarray(per_function, dtype=np.float64).reshape(len(per_function), -1)
    usable = np.isfinite(values).any(axis=1) & ~np.isinf(values).any(axis=1)
    unusable = ~usable
    if not unusable.any():
        return usable
    counts = [f"{name!r} gave {kinds(values[unusable, column])}" for column, name in enumerate(names)
              if not np.isfinite(values[unusable, column]).all()]
    message = (f"step {step}: {int(unusable.sum())} of {len(values)} rollouts have no usable reward "
               f"(reward function {'; '.join(counts)})")
    if not usable.any() and policy == "error":
        raise NoUsableRewardError(f"{message}, so the step has no outcome; fix the reward function, or set "
                                  f"{option} to record such steps as failed and go on")
    warnings.warn(f"{message}; they are not counted as trials", RewardWarning, stacklevel=3)
    return usable


def kinds(values: np.ndarray) -> str:
    """'3 None/NaN, 1 inf' for the non-finite entries of `values`."""
    missing, infinite = int(np.isnan(values).sum()), int(np.isinf(values).sum())
    return ", ".join(part for part in (f"{missing} None/NaN" if missing else "",
                                       f"{infinite} inf" if infinite else "") if part)
