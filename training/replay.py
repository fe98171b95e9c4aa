"""Replay a logged trace against any predictor, prequentially.

A trace is any table with at least `step, prompt_id, successes, trials` (parquet, CSV or JSONL),
from mpts or any other RL system. Steps are fed in order; at each step the predictor predicts the
step's prompts, the prediction is scored against the outcome, and only then is the outcome
observed. Rows repeating a (step, prompt_id) pair are summed (per-rollout logs work as they are).
Prompt ids are labels (any integers, strings or hashes), never array indices: the predictor sees
them as rows 0..n-1 in order of first appearance, and the scored table keeps the labels.

Every number is checked before anything runs: counts must be whole, finite, non-negative, not
booleans, and at most MAX_COUNT (exact in the predictors' float32); steps at most MAX_STEP.
Errors name the file, the column and the row.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mpts.inference.schema import OUTCOME_COLUMNS
from mpts.inference.scoring import score_trace
from mpts.inference.scoring_stream import StreamedScores
from mpts.models.base import PromptPool
from mpts.training.memory import MemoryNeed, check_fits, predictor_state_bytes
from mpts.training.selector import Selector
from mpts.training.selector_factory import build_selector, plan_selector
from mpts.training.trace_files import DEFAULT_CHUNK_ROWS, TableError, as_labels, iter_table

MAX_COUNT = 2**24  # successes and trials of one (step, prompt): exact in float32
MAX_STEP = 2**31 - 1  # predictors keep steps as int32


class TraceError(ValueError):
    """A trace file that cannot be replayed; the message names the file and the column."""


def trace_files(path: Path | str) -> list[Path]:
    """The files holding a trace: the file itself, or a run folder's trace (any way in: the
    mpts loop, TRL, verl) -- its trace.parquet, else the trace parts of an unfinished run."""
    path = Path(path)
    if not path.is_dir():
        if not path.is_file():
            raise TraceError(f"trace file {path} does not exist")
        return [path]
    if (path / "trace.parquet").is_file():
        return [path / "trace.parquet"]
    parts = sorted((path / "parts").glob("trace-*.parquet")) if (path / "parts").is_dir() else []
    if parts:
        return parts
    raise TraceError(f"trace {path} is a folder with neither trace.parquet nor parts/trace-*.parquet; "
                     f"give a run folder or a trace file")


def is_run_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "trace.parquet").is_file() or (path / "parts").is_dir())


def iter_trace_chunks(path: Path | str, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[pd.DataFrame]:
    """Checked chunks of a trace (file or run folder): labels and int64 counts, not yet summed."""
    for file in trace_files(path):
        try:
            for chunk in iter_table(file, chunk_rows):
                yield checked_rows(chunk, str(file))
        except TableError as error:
            raise TraceError(str(error)) from None


def read_trace(path: Path | str) -> pd.DataFrame:
    chunks = list(iter_trace_chunks(path))
    if not chunks:
        raise TraceError(f"{path}: the trace has no rows")
    return validate_trace(pd.concat(chunks) if len(chunks) > 1 else chunks[0], str(path))


def checked_rows(frame: pd.DataFrame, source: str = "trace") -> pd.DataFrame:
    """The outcome columns of `frame`, every value checked; prompt ids as labels (see
    `trace_files.as_labels`), counts as int64. Rows are not summed (see `validate_trace`)."""
    missing = [c for c in OUTCOME_COLUMNS if c not in frame.columns]
    if missing:
        raise TraceError(f"{source}: missing column(s) {', '.join(missing)}; a trace needs {', '.join(OUTCOME_COLUMNS)}")
    out = frame[list(OUTCOME_COLUMNS)].copy()
    limits = {"step": MAX_STEP, "successes": MAX_COUNT, "trials": MAX_COUNT}
    for column, limit in limits.items():
        if pd.api.types.is_bool_dtype(out[column]) or (
                out[column].dtype == object and out[column].map(lambda v: isinstance(v, bool)).any()):
            raise TraceError(f"{source}: column {column!r} holds booleans; it needs whole numbers")
        values = pd.to_numeric(out[column], errors="coerce")
        bad = values.isna() | ~np.isfinite(values.astype(float))
        _refuse(bad, f"{source}: column {column!r} has a missing or non-numeric value", frame[column])
        _refuse(values < 0, f"{source}: column {column!r} is negative", values)
        _refuse(values != values.round(), f"{source}: column {column!r} must hold whole numbers; it has", values)
        _refuse(values > limit, f"{source}: column {column!r} is larger than {limit}", values)
        out[column] = values.astype(np.int64)
    try:
        out["prompt_id"] = as_labels(out["prompt_id"], source)
    except TableError as error:
        raise TraceError(str(error)) from None
    return out


def validate_trace(frame: pd.DataFrame, source: str = "trace") -> pd.DataFrame:
    """Check columns and values; returns one row per (step, prompt id label), counts as int64."""
    if frame.empty and all(c in frame.columns for c in OUTCOME_COLUMNS):
        raise TraceError(f"{source}: the trace has no rows")
    out = checked_rows(frame, source)
    if out.empty:
        raise TraceError(f"{source}: the trace has no rows")
    return pd.concat([_summed(rows, source) for _, rows in out.groupby("step", sort=True)], ignore_index=True)


def _summed(rows: pd.DataFrame, source: str) -> pd.DataFrame:
    """One step's rows summed per prompt, plain-integer labels first (by value), then text labels."""
    labels = rows["prompt_id"]
    text = labels.map(type).eq(str).to_numpy() if labels.dtype == object else np.zeros(len(rows), bool)
    parts = [part.groupby(["step", "prompt_id"], as_index=False, sort=True)[["successes", "trials"]].sum()
             for part in (rows[~text], rows[text]) if len(part)]
    out = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
    if (out["trials"] < 1).any():
        row = out[out["trials"] < 1].iloc[0]
        raise TraceError(f"{source}: trials must be >= 1 (step {row.step}, prompt {row.prompt_id} has 0)")
    if (out["trials"] > MAX_COUNT).any():
        row = out[out["trials"] > MAX_COUNT].iloc[0]
        raise TraceError(f"{source}: column 'trials' sums to more than {MAX_COUNT} at step {row.step}, prompt {row.prompt_id}")
    over = out["successes"] > out["trials"]
    if over.any():
        row = out[over].iloc[0]
        raise TraceError(f"{source}: successes > trials at step {row.step}, prompt {row.prompt_id} "
                         f"({row.successes} > {row.trials})")
    return out


def _refuse(bad: pd.Series, message: str, shown: pd.Series) -> None:
    if bad.any():
        position = int(np.flatnonzero(bad.to_numpy())[0])
        raise TraceError(f"{message} ({shown.iloc[position]!r}) at row {shown.index[position]}")


def replay(trace: pd.DataFrame, predictor: str, options: dict[str, Any] | None = None, *,
           num_prompts: int | None = None, seed: int = 0, pool: PromptPool | None = None,
           ) -> tuple[dict[str, Any], pd.DataFrame]:
    """Score `predictor` prequentially on a validated trace; returns (scores, scored rows).

    `pool` carries what is known about the prompts (texts, embeddings, clusters; see
    `mpts.training.logs.replay_pool`); without it the pool is bare ids. (`replay_stream.replay_file`
    scores a trace file in bounded memory through the same `replay_steps`.)
    """
    if pool is None:
        rows_of_labels, labels = pd.factorize(trace["prompt_id"], sort=False)
        size = len(labels) if num_prompts is None else num_prompts
        if size < len(labels):
            raise TraceError(f"trace has {len(labels)} distinct prompt ids but num_prompts is {size}")
    else:  # a log reader numbered the prompts: the ids are the pool's rows
        rows_of_labels, size = trace["prompt_id"].to_numpy(np.int64), pool.size
        if int(rows_of_labels.max()) >= size or int(rows_of_labels.min()) < 0:
            raise TraceError(f"trace has prompt id {int(rows_of_labels.max())} but the prompt pool has {size} prompts")
    selector, _ = replay_selector(predictor, options, size, seed, pool)
    trace = trace.assign(_row=rows_of_labels)
    steps = ((int(step), rows["_row"].to_numpy(), rows["successes"].to_numpy(), rows["trials"].to_numpy())
             for step, rows in trace.groupby("step", sort=True))
    scores, scored = replay_steps(selector, steps, predictor, keep_table=True)
    labels_by_row = trace.drop_duplicates("_row").set_index("_row")["prompt_id"]
    scored.insert(1, "prompt_id", labels_by_row.reindex(scored.pop("_row")).to_numpy())
    return scores, scored


def replay_selector(predictor: str, options: dict[str, Any] | None, size: int, seed: int,
                    pool: PromptPool | None = None) -> tuple[Selector, Any]:
    """A selector over `size` prompts for `predictor` with `options`, refused up front if its state
    would not fit in memory; returns it and the checked options."""
    plan = plan_selector(predictor, predictor_options=options)
    feature_dim = pool.feature_dim if pool is not None else 0
    check_fits(MemoryNeed({"distinct prompt ids": predictor_state_bytes(plan.predictor, plan.predictor_options, size,
                                                                       feature_dim)}),
               f"replaying {size} prompts with {predictor}")
    pool = pool if pool is not None else PromptPool(size=size)
    return build_selector(plan, pool, seed=seed), plan.predictor_options


def replay_steps(selector: Selector, steps, predictor: str, *, keep_table: bool, rows: int | None = None,
                 ) -> tuple[dict[str, Any], pd.DataFrame | None]:
    """Feed (step, rows, successes, trials) in step order: predict, score, then observe.

    Without `keep_table` the scores are accumulated step by step in a few bytes per row
    (`scoring_stream`; `rows`: how many scored rows will come, when known); with it the whole
    scored table (with a `_row` column) is kept and returned."""
    streamed = StreamedScores(rows)
    tables, count = [], 0
    for step, prompt_rows, successes, trials in steps:
        ids = torch.as_tensor(np.array(prompt_rows, dtype=np.int64))
        s = torch.tensor(np.asarray(successes), dtype=torch.float32)
        k = torch.tensor(np.asarray(trials), dtype=torch.float32)
        posterior = selector.predict(ids, step)
        columns = selector.prediction_columns(posterior, s, k, step)
        selector.observe(ids, s, k, step)
        count += 1
        if keep_table:
            tables.append(pd.DataFrame({"step": step, "_row": np.asarray(prompt_rows),
                                        "successes": np.asarray(successes), "trials": np.asarray(trials), **columns}))
        else:  # a replay knows no true p: the interval columns would never be scored
            streamed.add({"successes": np.asarray(successes), "trials": np.asarray(trials), **columns})
    if count == 0:
        raise TraceError("the trace has no rows")
    if not keep_table:
        return {"predictor": predictor, "steps": count, **streamed.result()}, None
    table = pd.concat(tables, ignore_index=True)
    table["failed"] = False
    return {"predictor": predictor, "steps": count, **score_trace(table)}, table
