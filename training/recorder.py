"""One run recorder for every way in (the mpts loop, the TRL adapter, the verl adapter).

Each step's trace rows and metrics row are built here (`trace_rows`, `step_metrics`) and handed
to a `RunRecorder`, which buffers them and writes them as parts of the run folder
(`training/run_dir.py`: parts -> manifest with sha256 -> checkpoint, each atomic). A part is
written at every checkpoint, at the end, and whenever the buffer holds `flush_rows` trace rows
or `flush_seconds` have passed since the last part, so a step costs what it added (a list
append, and now and then a part of bounded size), never a rewrite of the run so far. The final
tables (trace.parquet, metrics.parquet, summary.json) are written once, by `finish`, from the
verified parts; the summary comes from `summary_record`, the same for every way in.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from mpts.inference.scoring import run_summary
from mpts.training.run_dir import RunFolder

FLUSH_ROWS = 8192       # trace rows buffered before they are written as a part
FLUSH_SECONDS = 60.0    # at most this long between parts, so a crash loses little


def trace_rows(step: int, ids: torch.Tensor, successes: torch.Tensor, trials: torch.Tensor,
               columns: dict[str, np.ndarray], rule: str, *, kept: torch.Tensor | None = None,
               failed: torch.Tensor | None = None, true_p: torch.Tensor | None = None) -> pd.DataFrame:
    """One step's trace rows in the run-folder schema (`inference/schema.py: TRACE_FIELDS`).

    `columns` are the selector's prediction columns, made before the outcome; `failed` prompts
    have no usable outcome; `kept` defaults to the prompts that did not fail."""
    n = int(ids.shape[0])
    failed = torch.zeros(n, dtype=torch.bool) if failed is None else failed.bool()
    kept = ~failed if kept is None else kept.bool()
    return pd.DataFrame({
        "step": np.full(n, step, dtype=np.int64),
        "prompt_id": ids.numpy().astype(np.int64),
        "successes": successes.numpy().astype(np.int64),
        "trials": trials.numpy().astype(np.int64),
        **columns,
        "selected_by": np.full(n, rule, dtype=object),
        "kept": kept.numpy(),
        "failed": failed.numpy(),
        "true_p": true_p.double().numpy() if true_p is not None else np.full(n, np.nan),
    })


def step_metrics(step: int, successes: torch.Tensor, trials: torch.Tensor, failed: torch.Tensor, *,
                 rollouts: int, cumulative_rollouts: int, wall_seconds: float, seconds: dict[str, float],
                 diagnostics: dict[str, Any], nonfinite_rewards: int = 0,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One step's metrics row (METRICS_REQUIRED and the columns every way in shares).

    `rollouts` counts every rollout spent, failed ones included; rates are over prompts with a
    usable outcome; `seconds` are phase timings (`predict`, `select`, `rollout`, ...);
    `nonfinite_rewards` counts rollouts whose reward was missing (None/NaN) or infinite;
    `extra` holds a way in's own columns (evaluations, environment diagnostics)."""
    ok = ~failed.bool()
    rates = successes[ok] / trials[ok]
    informative = ((successes > 0) & (successes < trials))[ok]
    elbo = diagnostics.get("elbo")
    return {
        "step": step, "rollouts": int(rollouts), "cumulative_rollouts": int(cumulative_rollouts),
        "prompts_rolled_out": int(successes.shape[0]),
        "effective_ratio": float(informative.float().mean()) if bool(ok.any()) else math.nan,
        "train_accuracy": float(rates.mean()) if bool(ok.any()) else math.nan,
        "eval_accuracy": math.nan, **(extra or {}), "wall_seconds": float(wall_seconds),
        **{f"{phase}_seconds": float(value) for phase, value in seconds.items()},
        "elbo": float(np.mean(elbo)) if elbo is not None and np.size(elbo) else math.nan,
        "failed_prompts": int((~ok).sum()), "nonfinite_rewards": int(nonfinite_rewards),
    }


def summary_record(*, config_name: str, predictor: str, acquisition: str, environment: str, seed: int,
                   target_accuracy: float, reference: str | None, trace: pd.DataFrame, metrics: pd.DataFrame,
                   initial_evals: dict[str, float] | None = None) -> dict[str, Any]:
    """summary.json: what the run was (and whether its rule is a reference arm), the evaluations
    before the first step (`initial_eval_accuracy`, ...; NaN where a trainer evaluates on its own),
    then `run_summary`, the one per-run computation the report repeats."""
    initial = {f"initial_{key}": float(value)
               for key, value in (initial_evals or {"eval_accuracy": math.nan}).items()}
    return {
        "config_name": config_name, "predictor": predictor, "acquisition": acquisition,
        "environment": environment, "seed": seed, "target_accuracy": target_accuracy,
        "reference": reference, **initial,
        **run_summary(trace, metrics, target_accuracy, initial),
    }


class RunRecorder:
    """Writes a run's steps into its run folder as parts, at a cost per step that does not grow with
    the run; `folder` is the `RunFolder` (create, resume checks, reading parts)."""

    def __init__(self, root: Path | str, *, flush_rows: int = FLUSH_ROWS, flush_seconds: float = FLUSH_SECONDS):
        self.folder = RunFolder(Path(root))
        self.flush_rows, self.flush_seconds = int(flush_rows), float(flush_seconds)
        self._buffered_rows = 0
        self._last_step: int | None = None
        self._last_write = time.monotonic()

    @property
    def root(self) -> Path:
        return self.folder.root

    def add_step(self, step: int, trace: pd.DataFrame, metrics: dict[str, Any]) -> None:
        self.folder.add_step(step, trace, metrics)
        self._buffered_rows += len(trace)
        self._last_step = step
        if self._buffered_rows >= self.flush_rows or time.monotonic() - self._last_write >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Write the buffered steps as one part of each kind (nothing when none are buffered)."""
        if self._last_step is not None:
            self.folder.flush(self._last_step)
        self._written()

    def checkpoint(self, step: int, state: dict[str, Any], steps_total: int) -> None:
        """The buffered parts, then the resume state (run_dir's write order)."""
        self.folder.checkpoint(step, state, steps_total)
        self._written()

    def finish(self, summary: Callable[[pd.DataFrame, pd.DataFrame], dict[str, Any]],
               predictor_state: dict[str, Any], posterior_draws: pd.DataFrame | None,
               steps_done: int, steps_total: int) -> dict[str, Any]:
        """Write the last part, then trace.parquet, metrics.parquet (from the verified parts) and
        summary.json (`summary(trace, metrics)`); returns the summary. The run is finished, so its
        write lock is released: a later resume (verl's or TRL's, in this process or another) may take it."""
        try:
            self.flush()
            trace, metrics = self.folder.read_parts("trace"), self.folder.read_parts("metrics")
            record = summary(trace, metrics)
            self.folder.finalize(record, predictor_state, posterior_draws)
            self.folder.write_progress(steps_done, steps_total, "done")
            return record
        finally:
            self.folder.unlock()

    def _written(self) -> None:
        self._buffered_rows, self._last_step, self._last_write = 0, None, time.monotonic()
