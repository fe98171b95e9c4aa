"""Where a command may write: outputs never replace a user's inputs or a run's files.

`mpts replay --out` and `mpts report --out` are checked here before anything is read or
written. Refused: a path equal to or inside an input, equal to or inside any run folder (a
folder with a config.yaml next to a trace.parquet or parts/), and an existing file or non-empty
folder that is not this command's own earlier output (a JSON marker key / a marker file).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

REPLAY_MARKER = {"written_by": "mpts replay"}  # a key in every scores JSON replay writes
REPORT_MARKER = ".mpts-report"  # a file in every folder report writes
_MARKER_READ_LIMIT = 1 << 20  # an output of ours is small; anything larger is not one


class OutputRefused(ValueError):
    """An --out that would overwrite an input, a run folder or someone else's file."""


def looks_like_run_folder(path: Path) -> bool:
    return (path / "config.yaml").is_file() and ((path / "trace.parquet").is_file() or (path / "parts").is_dir())


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _check_not_an_input_or_run(out: Path, inputs: Sequence[Path], flag: str) -> Path:
    target = out.resolve()
    for given in inputs:
        source = given.resolve()
        if _inside(target, source) or (source.is_file() and target == source):
            raise OutputRefused(f"{flag} {out} is {'the input' if target == source else 'inside the input'} "
                                f"{given}; write the output elsewhere (nothing was changed)")
    for folder in (target, *target.parents):
        if looks_like_run_folder(folder):
            raise OutputRefused(f"{flag} {out} is {'a run folder' if folder == target else f'inside the run folder {folder}'}; "
                                f"write the output elsewhere (nothing was changed)")
    return target


def check_scores_file(out: Path, inputs: Sequence[Path]) -> None:
    """`replay --out FILE`: a new file, or replay's own earlier scores."""
    target = _check_not_an_input_or_run(out, inputs, "--out")
    if target.is_dir():
        raise OutputRefused(f"--out {out} is a folder; name the JSON file to write (e.g. {out / 'scores.json'})")
    if target.exists() and not _is_own_scores(target):
        raise OutputRefused(f"--out {out} exists and is not scores written by mpts replay; "
                            f"choose a new file name (nothing was changed)")


def _is_own_scores(path: Path) -> bool:
    if not path.is_file() or path.stat().st_size > _MARKER_READ_LIMIT:
        return False
    try:
        payload = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(payload, dict) and all(payload.get(k) == v for k, v in REPLAY_MARKER.items())


def check_report_folder(out: Path, inputs: Sequence[Path]) -> None:
    """`report --out DIR`: a new or empty folder, or report's own earlier output."""
    target = _check_not_an_input_or_run(out, inputs, "--out")
    if target.exists() and not target.is_dir():
        raise OutputRefused(f"--out {out} is a file; report writes a folder (nothing was changed)")
    if target.is_dir() and any(target.iterdir()) and not (target / REPORT_MARKER).is_file():
        raise OutputRefused(f"--out {out} is a folder with other files in it, not an earlier mpts report; "
                            f"choose a new or empty folder (nothing was changed)")


def mark_report_folder(out: Path) -> None:
    (out / REPORT_MARKER).write_text("written by mpts report; a later report may replace this folder's files\n")
