"""Run folder I/O: the resolved config, the trace, step metrics, checkpoints, progress.

Layout of a run folder:

    config.yaml             the resolved config
    trace.parquet           one row per rolled-out prompt per step (columns: mpts.inference.schema)
    metrics.parquet         one row per step (METRICS_REQUIRED plus extras)
    summary.json            final scores
    posterior_draws.parquet draws of p for a sample of prompts from the final predictor
    progress.json           {"step", "steps", "status"}: how far a (long) run has come
    checkpoints/step-NNNNNNN.pt  everything needed to resume from that step (predictor, environment, RNG)
    checkpoints/latest.pt   the newest of them (a hard link, no second copy)
    checkpoints/predictor_final.pt
    parts/                  trace/metrics rows flushed at each checkpoint (merged at the end)
    parts/manifest.json     every part's step span, row count and sha256
    parts/.orphaned/<time>/ parts (and final tables) set aside by a resume or a rollback

Safety rules. Nothing here deletes a file. A resume first checks everything (config, every part
against the manifest, the checkpoint) and only then changes anything: parts written after the
checkpoint it resumes from (a crash in between, or `--rollback-to`) are moved to
`parts/.orphaned/`, never removed. Write order at a checkpoint is parts -> manifest -> checkpoint,
each atomic, so a crash at any moment leaves a folder a resume can verify.

Safety against the folder's own contents (run folders are data, shared between people and machines):
checkpoints are read with `torch.load(weights_only=True)` (`state_file`: nothing in them runs); every
write goes to a new, exclusively created temporary file renamed into place (`atomic`), so a link
planted in the folder is never written through, and `parts/` or `checkpoints/` being a link is
refused; a full disk is one line naming the file, and a resume checks free space before it moves
anything; one process writes a run at a time (`run_lock`: a flock on `.lock`, dropped when its holder
dies). A missing or damaged `latest.pt` resumes from the newest intact `step-*.pt`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mpts.inference.schema import METRICS_REQUIRED, TRACE_FIELDS  # noqa: F401  (METRICS_REQUIRED re-exported)
from mpts.training.atomic import DiskFullError, atomic_file, disk_full, disk_full_error, write_bytes
from mpts.training.run_lock import RunLock, RunLockedError
from mpts.training.state_file import UnreadableStateError, UnsafeStateError, load_state, save_state

logger = logging.getLogger(__name__)

TRACE_SCHEMA = pa.schema([(name, pa.type_for_alias(kind)) for name, kind in TRACE_FIELDS])

PART_KINDS = ("trace", "metrics")
PART_NAME = re.compile(r"^(trace|metrics)-(\d+)-(\d+)\.parquet$")
CHECKPOINT_NAME = re.compile(r"^step-(\d+)\.pt$")
FINAL_TABLES = ("trace.parquet", "metrics.parquet", "summary.json", "posterior_draws.parquet")
RESUME_SPACE_MARGIN = 1 << 20  # bytes beyond the manifest and one more checkpoint


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked; the message names the file and the way out."""


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    write_bytes(path, data)


def write_json(path: Path, payload: Any) -> None:
    """Strict JSON (NaN and inf written as null, which every JSON reader accepts), atomically."""
    _atomic_write_bytes(path, to_json(payload, indent=2).encode())


def to_json(payload: Any, **kwargs: Any) -> str:
    return json.dumps(_finite_or_null(payload), allow_nan=False, default=_json_default, **kwargs)


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, (np.generic, torch.Tensor)):
        value = value.item()
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    return value


def _json_default(value):
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _write_parquet(table: pa.Table, path: Path) -> None:
    with atomic_file(path) as handle:
        pq.write_table(table, handle)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Part:
    file: str
    kind: str
    first: int
    last: int
    rows: int
    sha256: str


@dataclass
class ResumePlan:
    """What a resume will do, worked out before anything is touched."""

    state: dict[str, Any] | None      # the checkpoint to load (None: start again from step 0)
    checkpoint: Path | None
    keep: list[Part]                  # parts up to the checkpoint, verified
    set_aside: list[str]              # files in parts/ (and final tables) to move to .orphaned/

    @property
    def step(self) -> int:
        return -1 if self.state is None else int(self.state["step"])


class RunFolder:
    """Writes one run's folder; buffers rows in memory between checkpoints."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.parts = self.root / "parts"
        self.checkpoints = self.root / "checkpoints"
        self.manifest_path = self.parts / "manifest.json"
        self._trace: list[pd.DataFrame] = []
        self._metrics: list[dict[str, Any]] = []
        self._first_unflushed: int | None = None
        self._lock = RunLock(self.root)

    # -- one writer at a time -------------------------------------------------------------------
    def lock(self) -> None:
        """Hold the run folder's write lock until `unlock` (or this process ends); refuses with one
        line while another process holds it. `create` takes it; a resume takes it before planning."""
        try:
            self._lock.acquire()
        except RunLockedError as error:
            raise RunFolderError(str(error)) from None

    def unlock(self) -> None:
        self._lock.release()

    # -- creating ------------------------------------------------------------------------------
    def check_new(self) -> None:
        """Raise unless a new run may be written here; touches nothing."""
        if self.root.exists() and not self.root.is_dir():
            raise RunFolderError(f"--out {self.root} is a file, not a folder; give a folder path for the run")
        if (self.root / "config.yaml").exists():
            raise FileExistsError(f"{self.root} already holds a run; use --resume {self.root} or another --out")
        if self.root.exists() and any(self.root.iterdir()):
            raise FileExistsError(f"{self.root} exists and is not empty; choose another --out")
        for parent in self.root.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise RunFolderError(f"--out {self.root}: {parent} is a file, not a folder")
                break

    def create(self, config_yaml: str) -> None:
        """Write the config of a new run (after `check_new` and after its components were built)."""
        if (self.root / "config.yaml").exists():
            raise FileExistsError(f"{self.root} already holds a run; use --resume {self.root} or another --out")
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock()
        if (self.root / "config.yaml").exists():  # another process created it before we held the lock
            raise FileExistsError(f"{self.root} already holds a run; use --resume {self.root} or another --out")
        self.parts.mkdir(exist_ok=True)
        self.checkpoints.mkdir(exist_ok=True)
        self._write_manifest([])
        _atomic_write_bytes(self.root / "config.yaml", config_yaml.encode())

    def config_yaml(self) -> str:
        path = self.root / "config.yaml"
        if not self.root.is_dir():
            raise RunFolderError(f"{self.root} is not a run folder (no such folder)")
        if not path.is_file():
            raise RunFolderError(f"{self.root} is not a run folder (no config.yaml)")
        return path.read_text()

    # -- the manifest ----------------------------------------------------------------------------
    def manifest(self) -> list[Part] | None:
        """The recorded parts; None for a folder written before manifests existed."""
        if not self.manifest_path.exists():
            return None
        try:
            entries = json.loads(self.manifest_path.read_text())["parts"]
            return [Part(**entry) for entry in entries]
        except (ValueError, KeyError, TypeError) as error:
            raise RunFolderError(f"{self.manifest_path} is unreadable ({error}); restore it from a backup "
                                 f"or resume with --rollback-to 0 to start again (its parts are kept)") from None

    def _write_manifest(self, parts: list[Part]) -> None:
        _atomic_write_bytes(self.manifest_path, self._manifest_bytes(parts))

    @staticmethod
    def _manifest_bytes(parts: list[Part]) -> bytes:
        payload = {"version": 1, "parts": [vars(p) for p in sorted(parts, key=lambda p: (p.first, p.kind))]}
        return json.dumps(payload, indent=1).encode()

    def _verify(self, part: Part) -> None:
        path = self.parts / part.file
        hint = f"resume with --rollback-to {part.first} to redo steps {part.first} onward (nothing is deleted)"
        if not path.is_file():
            raise RunFolderError(f"{path} is missing (steps {part.first}-{part.last}); {hint}")
        if _sha256(path) != part.sha256:
            raise RunFolderError(f"{path} is corrupt (checksum differs from parts/manifest.json); {hint}")
        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except Exception as error:
            raise RunFolderError(f"{path} is unreadable ({error}); {hint}") from None
        if rows != part.rows:
            raise RunFolderError(f"{path} has {rows} rows, the manifest records {part.rows}; {hint}")

    def _legacy_parts(self) -> list[Part]:
        """Parts of a folder without a manifest: read each one to prove it is whole."""
        parts = []
        for path in sorted(self.parts.glob("*.parquet")):
            match = PART_NAME.match(path.name)
            if not match:
                continue
            try:
                rows = pq.read_table(path).num_rows
            except Exception as error:
                raise RunFolderError(f"{path} is unreadable ({error}); resume with --rollback-to "
                                     f"{int(match[2])} to redo steps {int(match[2])} onward") from None
            parts.append(Part(path.name, match[1], int(match[2]), int(match[3]), rows, _sha256(path)))
        return parts

    # -- resuming --------------------------------------------------------------------------------
    def checkpoint_steps(self) -> list[int]:
        steps = [int(m[1]) for p in self.checkpoints.glob("step-*.pt") if (m := CHECKPOINT_NAME.match(p.name))]
        return sorted(steps)

    def _load_checkpoint(self, path: Path) -> dict[str, Any]:
        """A checkpoint's state, read without running anything (`state_file.load_state`).
        UnreadableStateError for a damaged file; RunFolderError for one holding other objects."""
        try:
            state = load_state(path)
        except UnsafeStateError as error:
            raise RunFolderError(f"checkpoint {error}; move it out of the run folder and resume again "
                                 f"(the newest other checkpoint is used; nothing was changed)") from None
        try:
            step = int(state["step"])
        except (TypeError, KeyError, ValueError, IndexError):
            raise UnreadableStateError(path, "no step recorded") from None
        if self._step_of(path) not in (step, 1 << 62):
            raise UnreadableStateError(path, f"it records step {step}, its name another")
        return state

    def _newest_intact(self, candidates: list[Path]) -> tuple[Path, dict[str, Any]] | None:
        """The first of `candidates` (newest first) that loads; None when there are none. A damaged one
        is passed over (with a warning); none intact is a one-line error."""
        damaged: list[UnreadableStateError] = []
        for path in candidates:
            try:
                state = self._load_checkpoint(path)
            except UnreadableStateError as error:
                damaged.append(error)
                continue
            for error in damaged:
                logger.warning("checkpoint %s is unreadable (%s); resuming from %s", error.path, error.reason, path)
            return path, state
        if damaged:
            raise RunFolderError(f"checkpoint {damaged[0]}; no other intact checkpoint is left to resume from; "
                                 "resume with --rollback-to 0 to start again (nothing is deleted)")
        return None

    @staticmethod
    def _step_of(path: Path) -> int:
        match = CHECKPOINT_NAME.match(path.name)
        return int(match[1]) if match else 1 << 62  # latest.pt: newer than every step file

    def plan_resume(self, rollback_to: int | None = None) -> ResumePlan:
        """Check the folder and choose the checkpoint; changes nothing.

        `rollback_to=STEP` resumes from the newest checkpoint before STEP (none: from the start),
        so steps STEP onward are run again and their old rows are set aside.
        """
        self.config_yaml()
        if rollback_to is not None and rollback_to < 0:
            raise RunFolderError(f"--rollback-to must be a step >= 0, got {rollback_to}")
        self._refuse_linked_folders()
        # newest first: latest.pt, then each step-*.pt (latest.pt deleted or damaged: the newest intact one)
        older = [s for s in self.checkpoint_steps() if rollback_to is None or s < rollback_to]
        candidates = [self.checkpoints / f"step-{s:07d}.pt" for s in reversed(older)]
        latest = self.checkpoints / "latest.pt"
        if rollback_to is None and (latest.exists() or latest.is_symlink()):
            candidates.insert(0, latest)
        found = self._newest_intact(candidates)
        checkpoint, state = found if found is not None else (None, None)
        step = -1 if state is None else int(state["step"])

        recorded = self.manifest()
        parts = self._legacy_parts() if recorded is None else recorded
        keep = [p for p in parts if p.last <= step]
        straddling = [p for p in parts if p.first <= step < p.last]
        if straddling:
            raise RunFolderError(f"{self.parts / straddling[0].file} spans steps {straddling[0].first}-"
                                 f"{straddling[0].last} across the checkpoint at step {step}; resume with "
                                 f"--rollback-to {straddling[0].first}")
        if recorded is not None:  # parts of a folder without a manifest were proven whole by reading them
            for part in keep:
                self._verify(part)
        for kind in PART_KINDS:
            spans = sorted((p.first, p.last) for p in keep if p.kind == kind)
            expected = 0
            for first, last in spans:
                if first != expected:
                    raise RunFolderError(f"{self.parts}: {kind} rows for steps {expected}-{first - 1} are missing; "
                                         f"resume with --rollback-to {expected} to redo them")
                expected = last + 1
            if expected != step + 1:
                raise RunFolderError(f"{self.parts}: {kind} rows for steps {expected}-{step} are missing; "
                                     f"resume with --rollback-to {expected} to redo them")
        kept_files = {p.file for p in keep}
        set_aside = sorted(p.name for p in self.parts.glob("*.parquet") if p.name not in kept_files)
        if rollback_to is not None:
            set_aside += [name for name in FINAL_TABLES if (self.root / name).exists()]
        return ResumePlan(state, checkpoint, keep, set_aside)

    def _refuse_linked_folders(self) -> None:
        """Writes go into parts/ and checkpoints/: a link there would send them out of the run."""
        for folder in (self.parts, self.checkpoints, self.parts / ".orphaned"):
            if folder.is_symlink():
                raise RunFolderError(f"{folder} is a symbolic link; a run folder writes only into its own "
                                     "folders: replace the link with the folder it points to")

    def _check_free_space(self, plan: ResumePlan) -> None:
        """Before a resume changes anything: room for the manifest and one more checkpoint."""
        need = RESUME_SPACE_MARGIN + 1024 * (len(plan.keep) + 1)
        if plan.checkpoint is not None:
            need += plan.checkpoint.stat().st_size
        free = shutil.disk_usage(self.root).free
        if free < need:
            raise DiskFullError(f"no space left on device for resuming {self.root}: {free / 2**20:.1f} MiB free, "
                                f"about {need / 2**20:.1f} MiB needed (the manifest and one checkpoint); free some "
                                "space and resume again (nothing was changed)")

    def apply(self, plan: ResumePlan) -> Path | None:
        """Carry out a checked plan: surplus files move to parts/.orphaned/<time>/; returns that folder.
        Free space is checked first and the new manifest written (not yet in place) before anything moves,
        so a full disk changes nothing."""
        self._check_free_space(plan)
        target = None
        with atomic_file(self.manifest_path) as manifest:
            manifest.write(self._manifest_bytes(plan.keep))
            manifest.flush()  # a full disk shows here, before anything moves
            if plan.set_aside:
                (self.parts / ".orphaned").mkdir(exist_ok=True)
                target = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%dT%H%M%S-"), dir=self.parts / ".orphaned"))
                for name in plan.set_aside:
                    source = self.parts / name if (self.parts / name).exists() else self.root / name
                    os.replace(source, target / name)
        if plan.checkpoint is not None and plan.checkpoint.name != "latest.pt":
            self._point_latest_at(plan.checkpoint)
        return target

    # -- rows ------------------------------------------------------------------------------------
    def add_step(self, step: int, trace: pd.DataFrame, metrics: dict[str, Any]) -> None:
        if self._first_unflushed is None:
            self._first_unflushed = step
        self._trace.append(trace)
        self._metrics.append(metrics)

    def flush(self, last_step: int) -> None:
        if self._first_unflushed is None:
            return
        first = self._first_unflushed
        span = f"{first:07d}-{last_step:07d}"
        tables = {
            "trace": pa.Table.from_pandas(pd.concat(self._trace, ignore_index=True), schema=TRACE_SCHEMA,
                                          preserve_index=False),
            "metrics": pa.Table.from_pandas(pd.DataFrame(self._metrics), preserve_index=False),
        }
        recorded = self.manifest() or []
        for kind, table in tables.items():
            path = self.parts / f"{kind}-{span}.parquet"
            _write_parquet(table, path)
            recorded.append(Part(path.name, kind, first, last_step, table.num_rows, _sha256(path)))
        self._write_manifest(recorded)
        self._trace, self._metrics, self._first_unflushed = [], [], None

    def checkpoint(self, step: int, state: dict[str, Any], steps_total: int) -> None:
        """Flush rows, then save resume state atomically (in that order: see module doc)."""
        self.flush(step)
        path = self.checkpoints / f"step-{step:07d}.pt"
        save_state({**state, "step": step}, path)
        self._point_latest_at(path)
        self.write_progress(step + 1, steps_total, "running")

    def _point_latest_at(self, path: Path) -> None:
        latest = self.checkpoints / "latest.pt"
        tmp = self.checkpoints / f"latest.pt.{secrets.token_hex(6)}.tmp"  # a new name: link() never overwrites
        try:
            os.link(path, tmp)
        except FileExistsError:
            return self._point_latest_at(path)
        except OSError as error:
            if disk_full(error):
                raise disk_full_error(latest) from None
            with atomic_file(latest) as handle, path.open("rb") as source:  # a file system without hard links
                shutil.copyfileobj(source, handle)
            return
        os.replace(tmp, latest)

    def write_progress(self, done: int, steps_total: int, status: str) -> None:
        write_json(self.root / "progress.json", {"step": done, "steps": steps_total, "status": status})

    # -- the end ---------------------------------------------------------------------------------
    def read_parts(self, kind: str) -> pd.DataFrame:
        """Every recorded part of `kind` in step order, each verified against the manifest."""
        recorded = self.manifest()
        parts = sorted((p for p in (self._legacy_parts() if recorded is None else recorded) if p.kind == kind),
                       key=lambda p: p.first)
        for part in parts:
            self._verify(part)
        if not parts:
            return pd.DataFrame()
        return pd.concat([pq.read_table(self.parts / p.file).to_pandas() for p in parts], ignore_index=True)

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
        save_state(predictor_state, self.checkpoints / "predictor_final.pt")
        write_json(self.root / "summary.json", summary)
