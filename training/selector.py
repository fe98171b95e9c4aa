"""The Selector: the one object every way in (mpts loop, replay, trainer adapters) calls.

It holds a predictor, an acquisition rule, the id <-> row mapping and the random streams:

    selection = selector.select(candidate_ids, batch_size, step)   # predict (pure), then the rule
    ...roll out selection.ids...
    columns = selector.prediction_columns(selection.posterior, successes, trials, step)  # trace
    selector.observe(selection.ids, successes, trials, step)

Ids are labels (strings or any integers), never array indices; rows are 0..n-1 of the
predictor's pool. Without `ids` the labels are the rows themselves.

Every random draw comes from its own stream, a generator seeded from a hash of
(seed, stream, step) (common random numbers): two arms of an ablation with the same seed see the
same candidate pool at every step whatever their rules chose before, and drawing PIT noise for
the trace (or skipping it) never changes what is selected next.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mpts.models.base import RiskPredictor, SuccessPosterior, check_prompt_ids
from mpts.models.posteriors import PointMassPosterior
from mpts.training.acquisition import Acquisition, sample_candidates

STREAMS = ("candidates", "acquisition", "environment", "predictor", "trace")


class RandomStreams:
    """Independent generators keyed by (seed, stream, step): nothing drawn in one stream or step
    shifts another."""

    def __init__(self, seed: int):
        if isinstance(seed, bool) or int(seed) != seed:
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.seed = int(seed)

    def seed_for(self, stream: str, step: int) -> int:
        if stream not in STREAMS:
            raise KeyError(f"unknown random stream {stream!r}; known: {', '.join(STREAMS)}")
        digest = hashlib.blake2b(f"{self.seed}/{stream}/{int(step)}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 1  # 63 bits: a valid torch seed

    def generator(self, stream: str, step: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed_for(stream, step))


class IdMap:
    """Labels <-> rows 0..n-1, vectorised (sorted labels + searchsorted); None: labels are rows."""

    def __init__(self, labels: Sequence[Any] | np.ndarray | Tensor | None, num_rows: int):
        self.num_rows = num_rows
        self.labels: np.ndarray | None = None
        if labels is None:
            return
        labels = np.asarray(labels.numpy() if isinstance(labels, Tensor) else labels)
        if labels.ndim != 1 or labels.shape[0] != num_rows:
            raise ValueError(f"ids must be a flat sequence of {num_rows} labels (one per row of the predictor's "
                             f"pool), got shape {labels.shape}")
        if labels.dtype.kind not in "iuU":
            raise TypeError(f"ids must be strings or integers, got dtype {labels.dtype}")
        order = np.argsort(labels, kind="stable")
        repeats = labels[order][1:] == labels[order][:-1]
        if repeats.any():
            raise ValueError(f"id {labels[order][1:][repeats][0].item()!r} appears more than once in ids")
        self.labels, self._order, self._sorted = labels, order, labels[order]

    def rows(self, ids: Any, *, purpose: str) -> Tensor:
        if self.labels is None:
            return check_prompt_ids(ids, self.num_rows, purpose=purpose)
        ids = np.asarray(ids.numpy() if isinstance(ids, Tensor) else ids)
        if ids.ndim != 1 or ids.shape[0] == 0:
            raise ValueError(f"ids to {purpose} must be a non-empty flat sequence, got shape {ids.shape}")
        if ids.dtype.kind not in "iuU" or (ids.dtype.kind == "U") != (self._sorted.dtype.kind == "U"):
            raise TypeError(f"ids to {purpose} have dtype {ids.dtype}, the selector's labels {self._sorted.dtype}")
        where = np.searchsorted(self._sorted, ids).clip(max=self.num_rows - 1)
        unknown = self._sorted[where] != ids
        if unknown.any():
            raise IndexError(f"unknown prompt id {ids[unknown][0].item()!r}: not among the selector's {self.num_rows} ids")
        return torch.from_numpy(self._order[where].astype(np.int64))

    def ids(self, rows: Tensor) -> Tensor | np.ndarray:
        return rows if self.labels is None else self.labels[rows.numpy()]


@dataclasses.dataclass(frozen=True)
class Selection:
    """What the rule chose, in rollout order, with the prediction made before any outcome.

    `positions` index the candidates passed to `select`; `posterior` is that of the chosen;
    `seconds` the wall time of the "predict" and "select" phases.
    """

    ids: Tensor | np.ndarray
    rows: Tensor
    positions: Tensor
    posterior: SuccessPosterior
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)


class Selector:
    """`rule` and `k` may be None where nothing is selected (replaying a logged trace)."""

    def __init__(self, predictor: RiskPredictor, rule: Acquisition | None = None, *, k: int | None = None,
                 seed: int = 0, ids: Sequence[Any] | np.ndarray | Tensor | None = None):
        if k is not None and (isinstance(k, bool) or int(k) != k or k < 1):
            raise ValueError(f"k (rollouts per prompt) must be a positive integer, got {k!r}")
        if (rule is None) != (k is None):
            raise ValueError("a selector needs both a rule and k (rollouts per prompt) to select, or neither")
        self.predictor, self.rule, self.k = predictor, rule, None if k is None else int(k)
        self.streams = RandomStreams(seed)
        self.id_map = IdMap(ids, predictor.num_prompts)

    @property
    def num_prompts(self) -> int:
        return self.predictor.num_prompts

    def rows(self, ids: Any, purpose: str = "select") -> Tensor:
        return self.id_map.rows(ids, purpose=purpose)

    def sample_candidates(self, num_candidates: int, step: int) -> Tensor | np.ndarray:
        """`num_candidates` distinct ids drawn uniformly from the pool (the "candidates" stream)."""
        rows = sample_candidates(self.num_prompts, num_candidates, self.streams.generator("candidates", step))
        return self.id_map.ids(rows)

    def predict(self, ids: Any, step: int) -> SuccessPosterior:
        """The predictor's posterior for these ids; its draws (if any) follow the "predictor" stream."""
        rows = self.rows(ids, "predict")
        with self._predictor_rng(step):
            return self.predictor.predict(rows, step)

    def select(self, candidates: Any, batch_size: int, step: int, *, truth: Tensor | None = None) -> Selection:
        """Predict the candidates, then let the rule choose `batch_size` of them (all of them, in
        rollout order, for a rule that rolls out everything). A rule that needs the true success
        probabilities (`oracle`) ranks on `truth` instead of the prediction."""
        if self.rule is None:
            raise ValueError("this selector has no acquisition rule: it can predict and observe, not select")
        rows = self.rows(candidates)
        start = time.perf_counter()
        with self._predictor_rng(step):
            posterior = self.predictor.predict(rows, step)
        predicted = time.perf_counter()
        if self.rule.needs_truth:
            if truth is None:
                raise ValueError(f"acquisition {self.rule.name!r} needs the true success probabilities, "
                                 "which this environment does not provide")
            truth = torch.as_tensor(truth, dtype=posterior.mean.dtype)
            if truth.shape != rows.shape:
                raise ValueError(f"truth has shape {tuple(truth.shape)}, the candidates {tuple(rows.shape)}")
            basis: SuccessPosterior = PointMassPosterior(truth)
        else:
            basis = posterior
        count = rows.shape[0] if self.rule.rolls_out_all else batch_size
        positions = self.rule.select(basis, count, self.streams.generator("acquisition", step), self.k)
        chosen = rows[positions]
        seconds = {"predict": predicted - start, "select": time.perf_counter() - predicted}
        return Selection(self.id_map.ids(chosen), chosen, positions, posterior.take(positions), seconds)

    def observe(self, ids: Any, successes: Tensor, trials: Tensor, step: int) -> dict[str, Any]:
        """Fold in outcomes (after they were predicted); returns the predictor's diagnostics."""
        rows = self.rows(ids, "observe")
        with self._predictor_rng(step):
            return self.predictor.observe(rows, successes, trials, step)

    def prediction_columns(self, posterior: SuccessPosterior, successes: Tensor, trials: Tensor, step: int,
                           failed: Tensor | None = None) -> dict[str, np.ndarray]:
        """The trace's prediction columns, PIT noise from the "trace" stream."""
        return prediction_columns(posterior, successes, trials, self.streams.generator("trace", step), failed)

    def state_dict(self) -> dict[str, Any]:
        return {"predictor": self.predictor.state_dict(),
                "rule": None if self.rule is None else self.rule.name, "k": self.k,
                "seed": self.streams.seed,
                "ids": None if self.id_map.labels is None else self.id_map.labels.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the predictor; refuses (changing nothing) a state from another setup."""
        mine = self.state_dict()
        for key in ("rule", "k", "seed", "ids"):
            if state.get(key) != mine[key]:
                shown = "a different id list" if key == "ids" else repr(state.get(key))
                raise ValueError(f"selector state has {key} {shown}, this selector has "
                                 f"{'its own' if key == 'ids' else repr(mine[key])}")
        self.predictor.load_state_dict(state["predictor"])

    @contextlib.contextmanager
    def _predictor_rng(self, step: int):
        """Draws the predictor makes from torch's global RNG (SVI subsamples, Pyro sites) follow
        the "predictor" stream, and the global state is left as it was. (The CPU generator is
        saved and restored directly: `torch.random.fork_rng` costs ~0.5 ms a call.)"""
        generator = torch.default_generator
        saved = generator.get_state()
        generator.manual_seed(self.streams.seed_for("predictor", step))
        try:
            yield
        finally:
            generator.set_state(saved)


def prediction_columns(posterior: SuccessPosterior, successes: Tensor, trials: Tensor,
                       generator: torch.Generator, failed: Tensor | None = None) -> dict[str, np.ndarray]:
    """What the predictor said about each rolled-out prompt, scored against its outcome."""
    trials = torch.as_tensor(trials, dtype=torch.float32)
    failed = torch.zeros(trials.shape, dtype=torch.bool) if failed is None else failed
    trials = trials.clamp_min(1.0)  # a failed prompt may report 0 trials; masked below
    successes = torch.minimum(torch.as_tensor(successes, dtype=torch.float32), trials)
    p_unsolved = posterior.log_prob(torch.zeros_like(trials), trials).exp()
    p_solved = posterior.log_prob(trials, trials).exp()
    log_prob = posterior.log_prob(successes, trials)
    pit = posterior.predictive_pit(successes, trials, generator)
    q25, q75 = posterior.interval(0.5)
    q05, q95 = posterior.interval(0.9)
    columns = {
        "pred_mean": posterior.mean, "pred_var": posterior.variance,
        "pred_p_informative": (1.0 - p_unsolved - p_solved).clamp(0.0, 1.0),
        "pred_p_unsolved": p_unsolved, "pred_p_solved": p_solved,
        "pred_log_prob": log_prob.masked_fill(failed, float("nan")),
        "pred_pit": pit.masked_fill(failed, float("nan")),
        "pred_q05": q05, "pred_q25": q25, "pred_q75": q75, "pred_q95": q95,
    }
    return {name: value.double().numpy() for name, value in columns.items()}
