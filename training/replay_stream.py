"""Replay of a trace file in bounded memory: the file is read in chunks, twice.

Pass 1 checks every row (as `replay.checked_rows`) and collects the distinct prompt labels, so
the predictor's pool size is known and the whole replay's memory can be checked up front. Pass 2
reads the chunks again, maps labels to rows, gathers each step's rows (a step may span chunks)
and feeds it to the predictor, keeping only the scored columns, as float32 (the predictors'
precision). Memory grows with the number of distinct prompts and scored rows, not with the
file's size or its per-rollout rows. A trace whose steps are not in order is read whole instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mpts.inference.scoring_stream import KEPT_BYTES_PER_ROW, SCORING_BYTES_PER_ROW
from mpts.training.memory import MemoryNeed, check_fits, predictor_state_bytes
from mpts.training.replay import (MAX_COUNT, DEFAULT_CHUNK_ROWS, TraceError, iter_trace_chunks, read_trace,
                                  replay, replay_steps, replay_selector)

# per scored row: the compact arrays kept (scoring_stream), then the most its scores add at once
SCORED_BYTES_PER_ROW = KEPT_BYTES_PER_ROW + SCORING_BYTES_PER_ROW
CHUNK_BYTES_PER_ROW = 400  # a chunk as parsed by pandas, its checked copy and the int64 block of pass 2
_ROW_BYTES_IN_MEMORY = 200  # a whole-file read: labels, counts, pandas overhead per row


class _Labels:
    """Distinct labels seen so far: plain-integer labels (int64) and text labels, kept sorted."""

    def __init__(self) -> None:
        self.ints, self.texts = np.empty(0, np.int64), np.empty(0, object)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_size = 0

    def add(self, labels: pd.Series) -> None:
        ints, texts = _split(labels)
        self._pending.append((np.unique(ints), np.unique(texts)))
        self._pending_size += len(self._pending[-1][0]) + len(self._pending[-1][1])
        if self._pending_size > len(self.ints) + len(self.texts):  # amortised: merge when pending doubles
            self.merge()

    def merge(self) -> None:
        if self._pending:
            ints = np.concatenate([self.ints, *(p[0] for p in self._pending)])
            texts = np.concatenate([self.texts, *(p[1] for p in self._pending)])
            self.ints = self.texts = None  # freed before sorting: a merge holds ~17 bytes per label at most
            self._pending, self._pending_size = [], 0
            self.ints, self.texts = _sorted_unique(ints), _sorted_unique(texts)

    @property
    def size(self) -> int:
        return len(self.ints) + len(self.texts)

    def rows(self, labels: pd.Series) -> np.ndarray:
        """Rows 0..n-1 in label order (integers by value, then texts); every label is known."""
        out = np.empty(len(labels), np.int64)
        is_text = _text_mask(labels)
        values = labels.to_numpy()
        out[~is_text] = np.searchsorted(self.ints, values[~is_text].astype(np.int64))
        out[is_text] = len(self.ints) + np.searchsorted(self.texts, values[is_text])
        return out

    def label(self, row: int) -> Any:
        return self.ints[row] if row < len(self.ints) else self.texts[row - len(self.ints)]


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique without its copy of the input: sorts `values` in place."""
    values.sort()
    if len(values) < 2:
        return values
    keep = np.empty(len(values), bool)
    keep[0] = True
    np.not_equal(values[1:], values[:-1], out=keep[1:])
    return values[keep]


def _text_mask(labels: pd.Series) -> np.ndarray:
    if labels.dtype != object:
        return np.zeros(len(labels), bool)
    return labels.map(type).eq(str).to_numpy()


def _split(labels: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    is_text = _text_mask(labels)
    values = labels.to_numpy()
    return values[~is_text].astype(np.int64), values[is_text].astype(object)


def replay_file(path: Path | str, predictor: str, options: dict[str, Any] | None = None, *, seed: int = 0,
                chunk_rows: int = DEFAULT_CHUNK_ROWS) -> dict[str, Any]:
    """Scores of `predictor` replayed on the trace at `path` (a file or a run folder), streamed."""
    labels, scored, rows, ordered, last = _Labels(), _ScoredRows(), 0, True, -1
    for chunk in iter_trace_chunks(path, chunk_rows):  # pass 1: check every row, collect labels
        labels.add(chunk["prompt_id"])
        rows += len(chunk)
        steps = chunk["step"].to_numpy()
        if len(steps):
            ordered = ordered and bool(steps[0] >= last) and bool((np.diff(steps) >= 0).all())
            last = int(steps[-1])
        if ordered:
            scored.add(chunk)
    labels.merge()
    if rows == 0:
        raise TraceError(f"{path}: the trace has no rows")
    if not ordered:  # steps out of order: a step's rows may be anywhere, so read the file whole
        check_fits(MemoryNeed({"trace rows": rows * _ROW_BYTES_IN_MEMORY}),
                   f"replaying {path} (its steps are not in order, so it is read whole)")
        scores, _ = replay(read_trace(path), predictor, options, seed=seed)
        return scores
    selector, cls_options = replay_selector(predictor, options, labels.size, seed)
    state = predictor_state_bytes(type(selector.predictor), cls_options, labels.size, 0)
    check_fits(stream_need(state, _label_bytes(labels), scored.total, min(chunk_rows, rows)),
               f"replaying {labels.size} prompts and {scored.total} scored rows of {path} with {predictor}")
    return replay_steps(selector, _steps(path, chunk_rows, labels), predictor, keep_table=False, rows=scored.total)[0]


def stream_need(state_bytes: int, label_bytes: int, scored_rows: int, chunk_rows: int) -> MemoryNeed:
    """What a streamed replay holds at its peak, beyond the interpreter and libraries."""
    return MemoryNeed({"distinct prompt ids": state_bytes + label_bytes,
                       "scored rows (distinct prompt ids per step)": scored_rows * SCORED_BYTES_PER_ROW,
                       "reading chunks": chunk_rows * CHUNK_BYTES_PER_ROW})


class _ScoredRows:
    """Rows the replay will score: distinct (step, prompt id) pairs, counted as the ordered steps
    go by; only the current step's distinct ids are held."""

    def __init__(self) -> None:
        self.done, self._pending = 0, None

    def add(self, chunk: pd.DataFrame) -> None:
        block = chunk[["step", "prompt_id"]]
        if self._pending is not None:
            block = pd.concat([self._pending, block], ignore_index=True)
        if block.empty:
            return
        finished = (block["step"] < block["step"].iloc[-1]).to_numpy()
        self.done += int((~block[finished].duplicated()).sum())
        self._pending = block[~finished].drop_duplicates()

    @property
    def total(self) -> int:
        return self.done + (0 if self._pending is None else len(self._pending))


def _label_bytes(labels: _Labels) -> int:
    return label_bytes(len(labels.ints), labels.texts)


def label_bytes(int_labels: int, texts: np.ndarray) -> int:
    """Bytes of the distinct labels in pass 2: the sorted keys, the texts' strings, a row index while mapping."""
    sample = texts[:1000]
    text_bytes = (sum(len(t) for t in sample) / len(sample) + 60) * len(texts) if len(sample) else 0
    return int(16 * (int_labels + len(texts)) + text_bytes)


def _steps(path: Path | str, chunk_rows: int, labels: _Labels) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """(step, rows, successes, trials) per step, rows summed per prompt and in row order."""
    pending: list[np.ndarray] = []
    for chunk in iter_trace_chunks(path, chunk_rows):  # pass 2
        block = np.stack([chunk["step"].to_numpy(np.int64), labels.rows(chunk["prompt_id"]),
                          chunk["successes"].to_numpy(np.int64), chunk["trials"].to_numpy(np.int64)])
        block = np.concatenate([*pending, block], axis=1) if pending else block
        if block.shape[1] == 0:
            continue
        last = block[0, -1]
        done = block[0] < last
        for step in np.unique(block[0, done]):
            yield _summed_step(int(step), block[:, block[0] == step], labels, str(path))
        pending = [block[:, ~done]]
    if pending and pending[0].shape[1]:
        yield _summed_step(int(pending[0][0, 0]), pending[0], labels, str(path))


def _summed_step(step: int, block: np.ndarray, labels: _Labels, source: str):
    rows, inverse = np.unique(block[1], return_inverse=True)
    successes = np.bincount(inverse, weights=block[2]).astype(np.int64)
    trials = np.bincount(inverse, weights=block[3]).astype(np.int64)
    for bad, message in ((trials < 1, "trials must be >= 1"), (trials > MAX_COUNT, f"column 'trials' sums to more "
                                                                 f"than {MAX_COUNT}"), (successes > trials, "successes > trials")):
        if bad.any():
            where = int(np.flatnonzero(bad)[0])
            raise TraceError(f"{source}: {message} at step {step}, prompt {labels.label(int(rows[where]))} "
                             f"({successes[where]} of {trials[where]})")
    return step, rows, successes, trials
