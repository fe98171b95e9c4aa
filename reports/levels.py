"""Where each arm spent its rollouts, level by level (a pool's difficulty levels, its clusters).

The trace holds prompt ids only; a run folder whose environment has levels also holds each pool
prompt's level (`prompt_levels.json`, written by the LM environment). Shares are of the prompts
rolled out (every trace row, failed ones too: their rollouts were spent), per window of steps.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from mpts.inference.schema import LEVELS_FILE


def read_levels(run_dir: Path) -> np.ndarray | None:
    """Each pool prompt's level, or None when the run folder has no levels file."""
    path = Path(run_dir) / LEVELS_FILE
    if not path.is_file():
        return None
    try:
        recorded = json.loads(path.read_text()) if path.stat().st_size else None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    levels = recorded.get("levels") if isinstance(recorded, dict) else None
    if not isinstance(levels, list) or not levels or not all(isinstance(v, int) and not isinstance(v, bool)
                                                               for v in levels):
        raise ValueError(f"{path} must hold {{\"levels\": [one integer level per pool prompt]}}")
    return np.asarray(levels, dtype=np.int64)


def level_shares(trace: pd.DataFrame, levels: np.ndarray, window: int) -> pd.DataFrame:
    """Share of each window's rolled-out prompts at each level: index window_start, one column per level."""
    ids = trace["prompt_id"].to_numpy(dtype=np.int64)
    if len(ids) and (ids.min() < 0 or ids.max() >= len(levels)):
        raise ValueError(f"trace has prompt ids outside the {len(levels)} levels recorded for the pool")
    frame = pd.DataFrame({"window_start": trace["step"].to_numpy() // window * window, "level": levels[ids]})
    counts = frame.groupby(["window_start", "level"]).size().unstack(fill_value=0)
    return counts.div(counts.sum(axis=1), axis=0)


def pooled_shares(per_seed: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Mean over seeds of the per-window shares (a level a seed never rolled out counts as 0)."""
    table = pd.concat(per_seed, keys=range(len(per_seed))).fillna(0.0)
    return table.groupby(level=1).mean().sort_index(axis=1)


def thirds(shares: pd.DataFrame) -> dict[int, tuple[float, float]]:
    """Per level: (mean share over the first third of the windows, over the last third)."""
    n = max(1, len(shares) // 3)
    return {int(level): (float(shares[level].iloc[:n].mean()), float(shares[level].iloc[-n:].mean()))
            for level in shares.columns}
