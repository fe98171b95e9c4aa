"""Readers for other RL systems' logs, turned into mpts traces (and prompt pools) for replay.

Three shapes are read:

- the mpts schema (`step, prompt_id, successes, trials`; see `replay.read_trace`);
- a verl rollout dump directory (`trainer.rollout_data_dir`): one `{step}.jsonl` per training
  step (steps start at 1), one line per rollout with `input`, `output`, `score`, `step` and reward
  extras such as `acc`. It carries no prompt id, so rollouts are grouped by their `input` text;
- a per-rollout table (parquet, CSV or JSONL) with a prompt-text column `prompt`, a `step` and a
  reward column.

A rollout counts as a success when its reward is >= `success_threshold` (default 1.0: a fully
correct answer under 0/1 rewards, and under rewards that add partial credit for the format).
Prompt texts become the pool's `texts`, so predictors that use embeddings (`gp`, `id_vae`) get
them; a sidecar table can supply embeddings and clusters instead (`read_prompt_info`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from mpts.models.base import PromptPool
from mpts.training.embeddings import text_pool
from mpts.training.replay import TraceError, is_run_folder, read_trace, validate_trace
from mpts.training.trace_files import TableError, as_labels, read_table, table_columns

DEFAULT_SUCCESS_THRESHOLD = 1.0
REWARD_COLUMNS = ("score", "reward", "acc", "correct", "success")  # looked for in this order


def successes_of(rewards: Tensor | np.ndarray, threshold: float = DEFAULT_SUCCESS_THRESHOLD,
                 scored: Tensor | None = None) -> Tensor:
    """Successes per row of a [prompts, k] reward matrix: how many rewards reach `threshold`.

    `scored` (bool, same shape) marks the rewards that exist; the others (NaN allowed) never count.
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float64)
    scored = torch.ones_like(rewards, dtype=torch.bool) if scored is None else torch.as_tensor(scored, dtype=torch.bool)
    if not bool(torch.isfinite(rewards[scored]).all()):
        raise ValueError("rewards contain NaN or infinite values; cannot count successes")
    return ((rewards >= _checked_threshold(threshold)) & scored).sum(-1)


def read_log(path: Path | str, *, success_threshold: float = DEFAULT_SUCCESS_THRESHOLD,
             reward_column: str | None = None) -> tuple[pd.DataFrame, tuple[str, ...] | None]:
    """(validated trace, prompt texts by prompt id or None) from any supported log shape."""
    path = Path(path)
    if is_run_folder(path):  # written by the mpts loop, the TRL or the verl adapter
        return read_trace(path), None
    if path.is_dir():
        return read_verl_dump(path, success_threshold=success_threshold, reward_column=reward_column)
    if not path.is_file():
        raise TraceError(f"trace {path} does not exist")
    frame = _read_table(path)
    if "prompt" in frame.columns:  # texts are kept whatever other columns the table has
        return rollouts_to_trace(frame, str(path), success_threshold=success_threshold,
                                 reward_column=reward_column)
    return validate_trace(frame, str(path)), None


def is_plain_trace(path: Path | str) -> bool:
    """A trace in the mpts schema with no prompt texts (a run folder, or a table without a
    `prompt` column): `replay_stream.replay_file` can stream it."""
    path = Path(path)
    if is_run_folder(path):
        return True
    if not path.is_file():
        return False
    try:
        return "prompt" not in table_columns(path)
    except TableError as error:
        raise TraceError(str(error)) from None


def read_verl_dump(folder: Path | str, *, success_threshold: float = DEFAULT_SUCCESS_THRESHOLD,
                   reward_column: str | None = None) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """A verl `rollout_data_dir`: every `{step}.jsonl` in it, grouped by prompt text per step."""
    folder = Path(folder)
    files = sorted((f for f in folder.glob("*.jsonl") if f.stem.isdigit()), key=lambda f: int(f.stem))
    if not files:
        raise TraceError(f"trace {folder} is a folder with no verl rollout dump files ({{step}}.jsonl) and is not a "
                         f"run folder (no trace.parquet or parts/); give a trace file, a run folder or a verl "
                         f"trainer.rollout_data_dir")
    rows = []
    for file in files:
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise TraceError(f"{file}: line {number} is not valid JSON ({error.msg})") from None
            if not isinstance(record, dict) or "input" not in record:
                raise TraceError(f"{file}: line {number} has no 'input' field; not a verl rollout dump line")
            step = record.get("step", int(file.stem))
            if step != int(file.stem):
                raise TraceError(f"{file}: line {number} says step {step!r} but the file is step {file.stem}")
            rows.append({**record, "step": int(file.stem), "prompt": record["input"]})
    return rollouts_to_trace(pd.DataFrame(rows), str(folder), success_threshold=success_threshold,
                             reward_column=reward_column)


def rollouts_to_trace(frame: pd.DataFrame, source: str, *, success_threshold: float = DEFAULT_SUCCESS_THRESHOLD,
                      reward_column: str | None = None) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """One row per rollout (`step`, `prompt`, a reward) -> the trace, prompt ids by first appearance."""
    threshold = _checked_threshold(success_threshold)
    for column in ("step", "prompt"):
        if column not in frame.columns:
            raise TraceError(f"{source}: missing column {column!r}; a per-rollout log needs step, prompt and a reward")
    if frame.empty:
        raise TraceError(f"{source}: the log has no rows")
    texts = frame["prompt"]
    bad = texts.map(lambda t: not isinstance(t, str))
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise TraceError(f"{source}: column 'prompt' has a missing or non-text value at row {row}")
    if "prompt_id" in frame.columns:  # the log's own ids key the prompts; texts follow them
        try:
            keys = as_labels(frame["prompt_id"], source)
        except TableError as error:
            raise TraceError(str(error)) from None
        _check_one_text_per_id(keys, texts, source)
    else:
        keys = texts
    counted = all(c in frame.columns for c in ("successes", "trials")) and reward_column is None
    if counted:  # a table of counts that also carries texts
        successes, trials = frame["successes"], frame["trials"]
    else:
        successes, trials = _successes_from_rewards(frame, source, threshold, reward_column), 1
    ids, unique_keys = pd.factorize(keys)
    first_text = pd.Series(texts.to_numpy()).groupby(ids).first()
    trace = pd.DataFrame({"step": frame["step"].to_numpy(), "prompt_id": ids.astype(np.int64),
                          "successes": np.asarray(successes), "trials": trials})
    return validate_trace(trace, source), tuple(str(t) for t in first_text.to_numpy())


def _check_one_text_per_id(keys: pd.Series, texts: pd.Series, source: str) -> None:
    pairs = pd.DataFrame({"id": keys.to_numpy(), "text": texts.to_numpy()}).drop_duplicates()
    clash = pairs["id"].duplicated(keep=False)
    if clash.any():
        raise TraceError(f"{source}: prompt_id {pairs['id'][clash].iloc[0]!r} has more than one prompt text")


def _successes_from_rewards(frame: pd.DataFrame, source: str, threshold: float, reward_column: str | None):
    column = reward_column or next((c for c in REWARD_COLUMNS if c in frame.columns), None)
    if column is None or column not in frame.columns:
        wanted = repr(reward_column) if reward_column else f"one of {', '.join(REWARD_COLUMNS)}"
        raise TraceError(f"{source}: no reward column ({wanted}); name it with --reward-column")
    rewards = pd.to_numeric(frame[column].map(_as_number), errors="coerce").astype(float)
    bad = ~np.isfinite(rewards.to_numpy())
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise TraceError(f"{source}: column {column!r} has a missing or non-numeric reward "
                         f"({frame[column].iloc[row]!r}) at row {row}")
    return (rewards >= threshold).astype(np.int64).to_numpy()


def read_prompt_info(path: Path | str, size: int, texts: tuple[str, ...] | None) -> dict[str, Tensor]:
    """A sidecar table of prompt information: `features` and/or `clusters` rows in pool order.

    Keyed by `prompt_id` (0..size-1) or by `prompt` text (matched to the log's texts); carries a
    `cluster` column (integers) and/or an `embedding` column (one list of floats per prompt).
    """
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"prompt info file {path} does not exist")
    table = _read_table(path)
    source = f"prompt info {path}"
    if "prompt_id" in table.columns:
        keys = pd.to_numeric(table["prompt_id"], errors="coerce")
        if keys.isna().any() or (keys != keys.round()).any():
            raise TraceError(f"{source}: column 'prompt_id' must hold whole numbers")
        rows = keys.astype(np.int64)
    elif "prompt" in table.columns:
        if texts is None:
            raise TraceError(f"{source}: keyed by 'prompt' text but the log has no prompt texts; key it by prompt_id")
        rows = table["prompt"].map({text: i for i, text in enumerate(texts)}).fillna(-1).astype(np.int64)
    else:
        raise TraceError(f"{source}: needs a 'prompt_id' or a 'prompt' column to say which prompt each row is")
    # A sidecar may describe a whole dataset: rows for prompts the log never saw are left out.
    inside = ((rows >= 0) & (rows < size)).to_numpy()
    table, rows = table[inside], rows.to_numpy()[inside]
    if len(np.unique(rows)) != len(rows):
        raise TraceError(f"{source}: a prompt is listed more than once")
    missing = np.setdiff1d(np.arange(size), rows)
    if missing.size:
        example = repr(texts[missing[0]]) if texts is not None else f"prompt id {missing[0]}"
        raise TraceError(f"{source}: {missing.size} of the log's {size} prompts are missing (e.g. {example})")
    order = np.argsort(rows)
    info: dict[str, Tensor] = {}
    if "cluster" in table.columns:
        clusters = pd.to_numeric(table["cluster"], errors="coerce").to_numpy()[order]
        if np.isnan(clusters).any() or (clusters != np.round(clusters)).any():
            raise TraceError(f"{source}: column 'cluster' must hold whole numbers for every prompt")
        info["clusters"] = torch.as_tensor(clusters.astype(np.int64))
    if "embedding" in table.columns:
        try:
            matrix = np.stack([np.asarray(v, dtype=np.float32) for v in table["embedding"].to_numpy()[order]])
        except (TypeError, ValueError) as error:
            raise TraceError(f"{source}: column 'embedding' must hold one equal-length list of numbers "
                             f"per prompt ({error})") from None
        if matrix.ndim != 2 or not np.isfinite(matrix).all():
            raise TraceError(f"{source}: column 'embedding' must be finite vectors of one length")
        info["features"] = torch.from_numpy(matrix)
    if not info:
        raise TraceError(f"{source}: no 'cluster' or 'embedding' column; nothing to add to the pool")
    return info


def replay_pool(trace: pd.DataFrame, texts: tuple[str, ...] | None,
                prompt_info: Path | str | None = None) -> PromptPool | None:
    """The pool a replay runs on: texts (embedded lazily) and whatever the sidecar supplies;
    None for a trace with neither (replay then numbers its prompt labels itself)."""
    if texts is None and prompt_info is None:
        return None
    if texts is not None:
        size = len(texts)
    elif pd.api.types.is_integer_dtype(trace["prompt_id"]) and int(trace["prompt_id"].min()) >= 0:
        size = int(trace["prompt_id"].max()) + 1
    else:
        raise TraceError("--prompt-info with a trace keyed by prompt_id needs integer ids 0..n-1 (the sidecar's keys)")
    info = read_prompt_info(prompt_info, size, texts) if prompt_info is not None else {}
    if texts is None or "features" in info:  # the sidecar's embeddings win over computing our own
        return PromptPool(size=size, texts=texts, **info)
    return text_pool(texts, clusters=info.get("clusters"))


def _read_table(path: Path) -> pd.DataFrame:
    try:
        return read_table(path)
    except TableError as error:
        raise TraceError(str(error)) from None


def _as_number(value):
    """Rewards as logged: numbers, booleans, or None (-> NaN, reported by the caller)."""
    if isinstance(value, bool):
        return float(value)
    return value


def _checked_threshold(threshold: float) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ValueError(f"success threshold must be a finite number, got {threshold!r}")
    return float(threshold)
