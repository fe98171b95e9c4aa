"""Shared by the sweep and executor tests: a tiny simulator grid and a result comparison."""

from pathlib import Path

import pandas as pd

TINY = {"name": "tiny", "steps": 4, "batch_size": 8, "candidate_ratio": 2, "checkpoint_every": 2,
        "posterior_draws_prompts": 4, "env": {"name": "sim", "num_prompts": 100, "eval_prompts": 50}}


def tiny_grid(**ablation) -> dict:
    return {**TINY, "ablation": {"seeds": [0, 1], "workers": 2, **ablation}}


def assert_same_results(first: Path, second: Path) -> None:
    """Trace rows and metric values equal (wall-clock timings aside)."""
    for name in ("trace.parquet", "metrics.parquet"):
        a, b = pd.read_parquet(first / name), pd.read_parquet(second / name)
        columns = [c for c in a if not c.endswith("_seconds")]
        assert len(a) > 0
        pd.testing.assert_frame_equal(a[columns], b[columns])
