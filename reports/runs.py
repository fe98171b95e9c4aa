"""Finding and reading run folders, and grouping them into ablation arms.

A run folder (written by `mpts run`) holds config.yaml, trace.parquet, metrics.parquet,
summary.json and, at the end of a run, posterior_draws.parquet. An ablation folder holds run
folders under `runs/<name>/`. Runs are grouped by (predictor, acquisition rule, and the point of
an ablation grid); seeds of one group are pooled by the report.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from mpts.inference.schema import DRAWS_COLUMNS, METRICS_REQUIRED, TRACE_COLUMNS, format_grid_value, require_columns

RUN_FILES = ("config.yaml", "trace.parquet", "metrics.parquet")

# what the report reads of a trace: every schema column but the bookkeeping of the selection
REPORTED_TRACE_COLUMNS = tuple(c for c in TRACE_COLUMNS if c not in ("selected_by", "kept"))


@dataclasses.dataclass(frozen=True)
class Run:
    """One run folder, read into memory."""

    path: Path
    name: str
    predictor: str
    acquisition: str
    seed: int
    target_accuracy: float
    config: dict[str, Any]
    recorded_summary: dict[str, Any] | None
    trace: pd.DataFrame
    metrics: pd.DataFrame
    draws: pd.DataFrame | None
    predictor_label: str = ""
    acquisition_label: str = ""

    @property
    def point(self) -> dict[str, str]:
        """The run's point in an ablation grid (`ablation.point` of its config), values as text."""
        point = (self.config.get("ablation") or {}).get("point") or {}
        return {str(key): format_grid_value(value) for key, value in point.items()}

    @property
    def point_label(self) -> str:
        """The grid point, less the component options the predictor and rule labels show."""
        return ", ".join(f"{key}={value}" for key, value in self.point.items()
                         if key.split(".")[0] not in ("predictor", "acquisition"))

    @property
    def group(self) -> str:
        return " · ".join(filter(None, [self.predictor_label, self.acquisition_label, self.point_label]))

    @property
    def has_elbo(self) -> bool:
        return "elbo" in self.metrics.columns and bool(self.metrics["elbo"].notna().any())


def is_run_folder(path: Path) -> bool:
    return all((path / name).is_file() for name in RUN_FILES)


def expand_run_dirs(paths: Sequence[Path | str]) -> tuple[list[Path], list[Path]]:
    """(run folders, skipped): folders named directly plus every finished run under an ablation's
    `runs/`; skipped are the ablation's sub-folders that are not finished runs (still running,
    crashed before the end)."""
    if not paths:
        raise ValueError("run_dirs is empty: give at least one run folder or ablation folder")
    found: list[Path] = []
    skipped: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is not a folder (expected a run folder or an ablation folder)")
        if is_run_folder(path):
            found.append(path)
            continue
        # hidden folders are not runs (the LM environment's shared warm-up cache lives in runs/.warmup-cache)
        inner = (sorted(p for p in (path / "runs").glob("*") if p.is_dir() and not p.name.startswith("."))
                 if (path / "runs").is_dir() else [])
        runs = [p for p in inner if is_run_folder(p)]
        skipped.extend(p for p in inner if not is_run_folder(p))
        if not runs:
            raise FileNotFoundError(
                f"{path} is neither a run folder (needs {', '.join(RUN_FILES)}) nor an ablation folder "
                f"with finished run folders under runs/<name>/")
        found.extend(runs)
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values()), skipped


def _config_field(config: dict[str, Any], dotted: str, where: Path) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ValueError(f"{where}: field {dotted} is missing")
        node = node[part]
    return node


def load_run(path: Path) -> Run:
    config_path = path / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a mapping")
    trace = pd.read_parquet(path / "trace.parquet")
    metrics = pd.read_parquet(path / "metrics.parquet").sort_values("step", ignore_index=True)
    require_columns(trace, REPORTED_TRACE_COLUMNS, str(path / "trace.parquet"))
    require_columns(metrics, METRICS_REQUIRED, str(path / "metrics.parquet"))
    if metrics.empty:
        raise ValueError(f"{path / 'metrics.parquet'} has no rows: the run recorded no step")
    draws = None
    if (path / "posterior_draws.parquet").is_file():
        draws = pd.read_parquet(path / "posterior_draws.parquet")
        require_columns(draws, DRAWS_COLUMNS, str(path / "posterior_draws.parquet"))
    summary_path = path / "summary.json"
    recorded = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    target = float(_config_field(config, "target_accuracy", config_path))
    if not 0.0 < target <= 1.0 or math.isnan(target):
        raise ValueError(f"{config_path}: target_accuracy must be in (0, 1], got {target}")
    return Run(
        path=path, name=path.name,
        predictor=str(_config_field(config, "predictor.name", config_path)),
        acquisition=str(_config_field(config, "acquisition.name", config_path)),
        seed=int(_config_field(config, "seed", config_path)),
        target_accuracy=target, config=config, recorded_summary=recorded,
        trace=trace, metrics=metrics, draws=draws,
    )


def _options(config: dict[str, Any], section: str) -> tuple[tuple[str, str], ...]:
    component = config.get(section) or {}
    return tuple(sorted((k, repr(v)) for k, v in component.items() if k != "name"))


def _component_labels(runs: Sequence[Run], section: str) -> list[str]:
    """The component's name, plus its options where runs of that name differ in them."""
    names = [getattr(r, section) for r in runs]
    options = [_options(r.config, section) for r in runs]
    variants: dict[str, set] = {}
    for name, opts in zip(names, options):
        variants.setdefault(name, set()).add(opts)
    labels = []
    for name, opts in zip(names, options):
        if len(variants[name]) > 1 and opts:
            labels.append(f"{name}(" + ", ".join(f"{k}={v}" for k, v in opts) + ")")
        else:
            labels.append(name)
    return labels


def load_runs(paths: Sequence[Path | str]) -> tuple[list[Run], list[Path]]:
    """(every run labelled with its group `predictor · rule`, sorted by group then seed;
    the unfinished run folders skipped)."""
    folders, skipped = expand_run_dirs(paths)
    runs = [load_run(p) for p in folders]
    predictors = _component_labels(runs, "predictor")
    rules = _component_labels(runs, "acquisition")
    labelled = [dataclasses.replace(r, predictor_label=p, acquisition_label=a)
                for r, p, a in zip(runs, predictors, rules)]
    seen: dict[tuple[str, int], Path] = {}
    for run in labelled:
        key = (run.group, run.seed)
        if key in seen:
            raise ValueError(f"runs {seen[key]} and {run.path} are both {run.group} with seed {run.seed}; "
                             f"pass each run once")
        seen[key] = run.path
    return sorted(labelled, key=lambda r: (r.group, r.seed)), skipped


def group_slug(group: str) -> str:
    """A file-name-safe form of a group label."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", group.replace(" · ", "__")).strip("-")
