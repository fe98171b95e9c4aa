"""The run folder's public tables, described once: trace, metrics and posterior-draw columns,
and the check that a table has what a reader needs.

Writers (training/run_dir.py) and readers (scoring, replay, reports/runs.py) all take their
column lists from here. Types are Arrow type names (`pyarrow.type_for_alias`), so this module
needs nothing beyond the standard library and pandas; the writer builds the Arrow schema.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pandas as pd

# One row per rolled-out prompt per step. Every pred_* column was computed before the outcome.
TRACE_FIELDS: tuple[tuple[str, str], ...] = (
    ("step", "int64"), ("prompt_id", "int64"), ("successes", "int64"), ("trials", "int64"),
    ("pred_mean", "double"), ("pred_var", "double"), ("pred_p_informative", "double"),
    ("pred_p_unsolved", "double"), ("pred_p_solved", "double"), ("pred_log_prob", "double"),
    ("pred_pit", "double"), ("pred_q05", "double"), ("pred_q25", "double"),
    ("pred_q75", "double"), ("pred_q95", "double"), ("selected_by", "string"),
    ("kept", "bool"), ("failed", "bool"), ("true_p", "double"),
)
TRACE_COLUMNS = tuple(name for name, _ in TRACE_FIELDS)
PREDICTION_COLUMNS = tuple(name for name in TRACE_COLUMNS if name.startswith("pred_"))
# what any RL system's log must hold to be replayed against a predictor
OUTCOME_COLUMNS = ("step", "prompt_id", "successes", "trials")
# what scoring a trace needs (the outcome and the prediction; true_p and failed are optional)
SCORED_COLUMNS = ("successes", "trials", "pred_mean", "pred_log_prob", "pred_p_informative",
                  "pred_p_unsolved", "pred_p_solved", "pred_pit", "pred_q05", "pred_q25", "pred_q75", "pred_q95")

# One row per step; environments may add columns (timings end in `_seconds`, diagnostics start
# with `train_`).
METRICS_REQUIRED = (
    "step", "rollouts", "cumulative_rollouts", "prompts_rolled_out", "effective_ratio", "train_accuracy",
    "eval_accuracy", "wall_seconds", "predict_seconds", "select_seconds", "rollout_seconds",
    "observe_seconds", "train_seconds",
)
LOOP_PHASES = ("predict", "select", "rollout", "observe", "train")

DRAWS_COLUMNS = ("prompt_id", "draw", "p", "true_p")

# A run folder may also hold each pool prompt's difficulty level (its cluster), written by an
# environment that has levels: {"levels": [level of prompt 0, level of prompt 1, ...]}; the report
# then shows where each arm spent its rollouts, level by level.
LEVELS_FILE = "prompt_levels.json"


class SchemaError(ValueError):
    """A table that lacks columns a reader needs; the message names the table and the columns."""


def require_columns(frame: pd.DataFrame, columns: Sequence[str], source: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise SchemaError(f"{source} lacks column(s) {', '.join(missing)}")


def format_grid_value(value: Any) -> str:
    """A sweep's grid value as one short string (run folder names, table cells, run-table columns)."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"))
