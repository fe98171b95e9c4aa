"""Replay a logged trace against any predictor, prequentially.

A trace is any table with at least `step, prompt_id, successes, trials` (parquet, CSV or JSONL),
from mpts or any other RL system. Steps are fed in order; at each step the predictor predicts the
step's prompts, the prediction is scored against the outcome, and only then is the outcome
observed. Rows repeating a (step, prompt_id) pair are summed (per-rollout logs work as they are).
Non-integer prompt ids (e.g. strings or hashes) are mapped to 0..n-1 in order of appearance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mpts.inference.scoring import score_trace
from mpts.models.base import PromptPool
from mpts.models.registry import get_predictor_class
from mpts.training.selector import Selector

REQUIRED_COLUMNS = ("step", "prompt_id", "successes", "trials")


class TraceError(ValueError):
    """A trace file that cannot be replayed; the message names the file and the column."""


def read_trace(path: Path | str) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"trace file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            frame = pd.read_parquet(path)
        elif suffix == ".csv":
            frame = pd.read_csv(path)
        elif suffix in (".jsonl", ".ndjson", ".json"):
            frame = pd.read_json(path, lines=True)
        else:
            raise TraceError(f"trace file {path}: unknown format {suffix!r}; use .parquet, .csv or .jsonl")
    except TraceError:
        raise
    except Exception as error:
        raise TraceError(f"trace file {path} could not be read as {suffix[1:]}: {error}") from None
    return validate_trace(frame, str(path))


def validate_trace(frame: pd.DataFrame, source: str = "trace") -> pd.DataFrame:
    """Check columns and values; returns one row per (step, prompt) with integer ids."""
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise TraceError(f"{source}: missing column(s) {', '.join(missing)}; a trace needs {', '.join(REQUIRED_COLUMNS)}")
    if frame.empty:
        raise TraceError(f"{source}: the trace has no rows")
    out = frame[list(REQUIRED_COLUMNS)].copy()
    for column in ("step", "successes", "trials"):
        values = pd.to_numeric(out[column], errors="coerce")
        bad = values.isna() | ~np.isfinite(values.astype(float))
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise TraceError(f"{source}: column {column!r} has a missing or non-numeric value "
                             f"({frame[column].iloc[row]!r}) at row {row}")
        if (values < 0).any():
            row = int(np.flatnonzero((values < 0).to_numpy())[0])
            raise TraceError(f"{source}: column {column!r} is negative ({values.iloc[row]}) at row {row}")
        if (values != values.round()).any():
            row = int(np.flatnonzero((values != values.round()).to_numpy())[0])
            raise TraceError(f"{source}: column {column!r} must hold whole numbers; row {row} has {values.iloc[row]}")
        out[column] = values.astype(np.int64)
    if out["prompt_id"].isna().any():
        raise TraceError(f"{source}: column 'prompt_id' has missing values")
    if pd.api.types.is_integer_dtype(out["prompt_id"]) and (out["prompt_id"] >= 0).all():
        out["prompt_id"] = out["prompt_id"].astype(np.int64)
    else:
        out["prompt_id"] = pd.factorize(out["prompt_id"].astype(str))[0].astype(np.int64)
    out = out.groupby(["step", "prompt_id"], as_index=False, sort=True)[["successes", "trials"]].sum()
    if (out["trials"] < 1).any():
        row = out[out["trials"] < 1].iloc[0]
        raise TraceError(f"{source}: trials must be >= 1 (step {row.step}, prompt {row.prompt_id} has 0)")
    over = out["successes"] > out["trials"]
    if over.any():
        row = out[over].iloc[0]
        raise TraceError(f"{source}: successes > trials at step {row.step}, prompt {row.prompt_id} "
                         f"({row.successes} > {row.trials})")
    return out


def replay(trace: pd.DataFrame, predictor: str, options: dict[str, Any] | None = None, *,
           num_prompts: int | None = None, seed: int = 0, pool: PromptPool | None = None,
           ) -> tuple[dict[str, Any], pd.DataFrame]:
    """Score `predictor` prequentially on a validated trace; returns (scores, scored rows).

    `pool` carries what is known about the prompts (texts, embeddings, clusters; see
    `mpts.training.logs.replay_pool`); without it the pool is bare ids.
    """
    cls = get_predictor_class(predictor)
    size = pool.size if pool is not None else int(trace["prompt_id"].max()) + 1 if num_prompts is None else num_prompts
    if size <= int(trace["prompt_id"].max()):
        raise TraceError(f"trace has prompt id {int(trace['prompt_id'].max())} but num_prompts is {size}")
    pool = pool if pool is not None else PromptPool(size=size)
    selector = Selector(cls(pool, cls.Options(**(options or {})), seed=seed), seed=seed)
    scored = []
    for step, rows in trace.groupby("step", sort=True):
        ids = torch.tensor(rows["prompt_id"].to_numpy())
        successes = torch.tensor(rows["successes"].to_numpy(), dtype=torch.float32)
        trials = torch.tensor(rows["trials"].to_numpy(), dtype=torch.float32)
        posterior = selector.predict(ids, int(step))
        scored.append(rows.assign(**selector.prediction_columns(posterior, successes, trials, int(step))))
        selector.observe(ids, successes, trials, int(step))
    table = pd.concat(scored, ignore_index=True)
    table["failed"] = False
    return {"predictor": predictor, "steps": int(trace["step"].nunique()), **score_trace(table)}, table
