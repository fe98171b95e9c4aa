"""Run folder I/O: the resolved config, the trace, step metrics, checkpoints, progress.

Layout of a run folder:

    config.yaml            the resolved config
    trace.parquet          one row per rolled-out prompt per step (columns: mpts.inference.schema)
    metrics.parquet        one row per step (METRICS_REQUIRED plus extras)
    summary.json           final scores
    posterior_draws.parquet draws of p for a sample of prompts from the final predictor
    progress.json          {"step", "steps", "status"}: how far a (long) run has come
    checkpoints/latest.pt  everything needed to resume (predictor, environment, RNG, step)
    checkpoints/predictor_final.pt
    parts/                 trace/metrics rows flushed at each checkpoint (merged at the end)

Rows are flushed to `parts/` right before each checkpoint, so on resume every row up to the
checkpoint's step is on disk; parts written after the last checkpoint (a crash in between) are
dropped, and the run continues with no lost or duplicated rows.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mpts.inference.schema import METRICS_REQUIRED, TRACE_FIELDS  # noqa: F401  (METRICS_REQUIRED re-exported)

TRACE_SCHEMA = pa.schema([(name, pa.type_for_alias(kind)) for name, kind in TRACE_FIELDS])


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json(path: Path, payload: Any) -> None:
    _atomic_write_bytes(path, json.dumps(payload, indent=2, default=_json_default).encode())


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _write_parquet(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


class RunFolder:
    """Writes one run's folder; buffers rows in memory between checkpoints."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.parts = self.root / "parts"
        self.checkpoints = self.root / "checkpoints"
        self._trace: list[pd.DataFrame] = []
        self._metrics: list[dict[str, Any]] = []
        self._first_unflushed: int | None = None

    # -- creating and resuming ---------------------------------------------------------------
    def create(self, config_yaml: str) -> None:
        if (self.root / "config.yaml").exists():
            raise FileExistsError(f"{self.root} already holds a run; use --resume {self.root} or another --out")
        if self.root.exists() and any(self.root.iterdir()):
            raise FileExistsError(f"{self.root} exists and is not empty; choose another --out")
        self.root.mkdir(parents=True, exist_ok=True)
        self.parts.mkdir(exist_ok=True)
        self.checkpoints.mkdir(exist_ok=True)
        _atomic_write_bytes(self.root / "config.yaml", config_yaml.encode())

    def remove(self) -> None:
        """Delete a folder this object created (a run whose set-up failed)."""
        shutil.rmtree(self.root, ignore_errors=True)

    def config_yaml(self) -> str:
        path = self.root / "config.yaml"
        if not path.is_file():
            raise FileNotFoundError(f"{self.root} is not a run folder (no config.yaml)")
        return path.read_text()

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The latest checkpoint, with any rows flushed after it removed from parts/."""
        path = self.checkpoints / "latest.pt"
        if not path.exists():
            self._drop_parts_after(-1)
            return None
        try:
            state = torch.load(path, weights_only=False)
        except Exception as error:  # a truncated or foreign file
            raise ValueError(f"checkpoint {path} is unreadable ({error}); the run cannot resume from it") from None
        self._drop_parts_after(int(state["step"]))
        return state

    def _drop_parts_after(self, step: int) -> None:
        for part in self.parts.glob("*.parquet"):
            first = int(part.stem.split("-")[1])
            if first > step:
                part.unlink()

    # -- rows ------------------------------------------------------------------------------------
    def add_step(self, step: int, trace: pd.DataFrame, metrics: dict[str, Any]) -> None:
        if self._first_unflushed is None:
            self._first_unflushed = step
        self._trace.append(trace)
        self._metrics.append(metrics)

    def flush(self, last_step: int) -> None:
        if self._first_unflushed is None:
            return
        span = f"{self._first_unflushed:07d}-{last_step:07d}"
        trace = pd.concat(self._trace, ignore_index=True)
        _write_parquet(pa.Table.from_pandas(trace, schema=TRACE_SCHEMA, preserve_index=False),
                       self.parts / f"trace-{span}.parquet")
        _write_parquet(pa.Table.from_pandas(pd.DataFrame(self._metrics), preserve_index=False),
                       self.parts / f"metrics-{span}.parquet")
        self._trace, self._metrics, self._first_unflushed = [], [], None

    def checkpoint(self, step: int, state: dict[str, Any], steps_total: int) -> None:
        """Flush rows, then save resume state atomically (in that order: see module doc)."""
        self.flush(step)
        tmp = self.checkpoints / "latest.pt.tmp"
        torch.save({**state, "step": step}, tmp)
        os.replace(tmp, self.checkpoints / "latest.pt")
        self.write_progress(step + 1, steps_total, "running")

    def write_progress(self, done: int, steps_total: int, status: str) -> None:
        write_json(self.root / "progress.json", {"step": done, "steps": steps_total, "status": status})

    # -- the end ---------------------------------------------------------------------------------
    def read_parts(self, kind: str) -> pd.DataFrame:
        files = sorted(self.parts.glob(f"{kind}-*.parquet"))
        if not files:
            return pd.DataFrame()
        return pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)

    def finalize(self, summary: dict[str, Any], predictor_state: dict[str, Any],
                 posterior_draws: pd.DataFrame | None) -> None:
        trace = self.read_parts("trace")
        metrics = self.read_parts("metrics")
        _write_parquet(pa.Table.from_pandas(trace, schema=TRACE_SCHEMA, preserve_index=False),
                       self.root / "trace.parquet")
        _write_parquet(pa.Table.from_pandas(metrics, preserve_index=False), self.root / "metrics.parquet")
        if posterior_draws is not None:
            _write_parquet(pa.Table.from_pandas(posterior_draws, preserve_index=False),
                           self.root / "posterior_draws.parquet")
        torch.save(predictor_state, self.checkpoints / "predictor_final.pt")
        write_json(self.root / "summary.json", summary)
