"""What a worker does with one run of a grid, whichever executor sent it.

`run_in_folder` runs into the driver's run folder (a process on the same machine: the local
executor), resuming from its last checkpoint. `run_detached` assumes no shared filesystem: it
gets the folder's files as bytes (empty for a new run, a stopped run's files to resume it), runs
in a private temporary folder and returns every file of the finished folder as bytes, for the
driver to write with `write_folder`.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

from mpts.training.atomic import write_bytes
from mpts.training.run_lock import LOCK_FILE


@dataclasses.dataclass(frozen=True)
class RunOutput:
    name: str
    summary: dict[str, Any]
    files: dict[str, bytes]  # path inside the run folder -> content; empty when written in place


def _run(config_json: dict[str, Any], folder: Path) -> dict[str, Any]:
    import torch

    from mpts.training.config import validate_config
    from mpts.training.loop import run

    config = validate_config(config_json)
    # the CPUs the run declared (one by default): more threads would oversubscribe its share
    torch.set_num_threads(max(1, int(config.ablation.cpus_per_run)))
    return run(config, folder, resume=(folder / "config.yaml").exists())


def run_in_folder(name: str, config_json: dict[str, Any], folder: str) -> RunOutput:
    return RunOutput(name, _run(config_json, Path(folder)), {})


def read_folder(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative POSIX path -> bytes); {} when it does not exist."""
    if not folder.is_dir():
        return {}
    return {path.relative_to(folder).as_posix(): path.read_bytes()  # a link is not the run's own file
            for path in sorted(folder.rglob("*"))
            if path.is_file() and not path.is_symlink() and not path.name.endswith(".tmp")
            and path.relative_to(folder).as_posix() != LOCK_FILE}  # the lock belongs to the folder, not the run


def run_detached(name: str, config_json: dict[str, Any], files: dict[str, bytes]) -> RunOutput:
    with tempfile.TemporaryDirectory(prefix="mpts-run-") as tmp:
        folder = Path(tmp) / name
        if files:
            write_folder(folder, files)
        summary = _run(config_json, folder)
        return RunOutput(name, summary, read_folder(folder))


def write_folder(folder: Path, files: dict[str, bytes]) -> None:
    """Make `folder` hold exactly `files`: each written atomically, summary.json last (it marks a
    finished run); files the run itself dropped on resume (rows after its last checkpoint) go."""
    for relative in files:
        if Path(relative).is_absolute() or ".." in Path(relative).parts:
            raise ValueError(f"run output names a path outside its folder: {relative}")
    folder.mkdir(parents=True, exist_ok=True)
    for relative in sorted(files, key=lambda r: r == "summary.json"):
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(path, files[relative])  # a new temporary file, renamed: a planted link is not followed
    for stale in set(read_folder(folder)) - set(files):
        (folder / stale).unlink()


def read_summary(folder: Path) -> dict[str, Any] | None:
    """A finished run's summary, else None."""
    path = folder / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is unreadable ({error}); move it aside to finish that run again") from None
    if not isinstance(summary, dict):
        raise ValueError(f"{path} does not hold a JSON object; move it aside to finish that run again")
    return summary
