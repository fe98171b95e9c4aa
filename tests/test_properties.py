"""Property-based tests generated from the schemas (hypothesis).

Configs: every field of `RunConfig` and of the chosen components' `Options` models is drawn from
its own type and range, plus values that must be refused (booleans, NaN/inf, below the minimum,
sizes beyond memory, wrong types). Property: either one clean error line naming a drawn field,
or a few steps run to finite metrics.

Traces: columns come from the public trace schema (`mpts.inference.schema`, via `TRACE_SCHEMA`); values are drawn valid or
broken (NaN, inf, 1e30, booleans, negatives, strings, successes > trials). Property: either one
clean error naming the file, or replay scores that are finite.
"""

import math
import typing

import annotated_types as at
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mpts.inference.schema import OUTCOME_COLUMNS as REQUIRED_COLUMNS
from mpts.models.registry import PREDICTORS
from mpts.training.acquisition import RULES
from mpts.training.cli import main
from mpts.training.config import RunConfig
from mpts.training.run_dir import TRACE_SCHEMA

PROPERTY = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# Sizes kept small so each valid example runs in about a second; what is *not* small is drawn
# on purpose among the refused values below.
BASE = {"steps": 3, "batch_size": 8, "candidate_ratio": 2, "checkpoint_every": 2, "posterior_draws_prompts": 4}
SMALL_ENV = {"num_prompts": 60, "eval_prompts": 20}
SMALL_PREDICTORS = {"gp": {"num_inducing": 8, "svi_steps": 1},
                    "id_vae": {"svi_steps": 1, "hash_buckets": 256, "replay_batches": 0}}
SKIP_FIELDS = {"name", "plugins", "ablation", "env", "predictor", "acquisition", "steps", "seed"}
REFUSED = [True, False, float("nan"), float("inf"), -float("inf"), "many", 10**13]


def _bounds(info):
    low, high = -100.0, 100.0  # valid draws stay moderate: the runs must be short
    for item in info.metadata:
        if isinstance(item, at.Ge):
            low = max(low, item.ge)
        elif isinstance(item, at.Gt):
            low = max(low, item.gt + 1e-3)
        elif isinstance(item, at.Le):
            high = min(high, item.le)
        elif isinstance(item, at.Lt):
            high = min(high, item.lt - 1e-3)
    return low, high


def _valid(info) -> st.SearchStrategy | None:
    """Values of a field's own type and range, or None for a type left to its default."""
    annotation = info.annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    optional = type(None) in typing.get_args(annotation)
    base = args[0] if len(args) == 1 else annotation
    low, high = _bounds(info)
    if base is bool:
        strategy = st.booleans()
    elif typing.get_origin(base) is typing.Literal:
        strategy = st.sampled_from(typing.get_args(base))
    elif base is int:
        strategy = st.integers(int(math.ceil(low)), int(max(math.ceil(low), min(high, math.ceil(low) + 6))))
    elif base is float:
        strategy = st.floats(low, high, allow_nan=False, allow_infinity=False)
    else:
        return None
    return st.one_of(st.none(), strategy) if optional else strategy


def _section(options_model, fixed: dict) -> st.SearchStrategy:
    """A dict of some fields of `options_model`, each valid or (sometimes) refused."""
    fields = {}
    for name, info in options_model.model_fields.items():
        if name in SKIP_FIELDS or name in fixed:
            continue
        valid = _valid(info)
        if valid is not None:
            fields[name] = st.one_of(*[valid] * 12, st.sampled_from(REFUSED))
    return st.fixed_dictionaries({}, optional=fields).map(lambda drawn: {**fixed, **drawn})


@st.composite
def configs(draw):
    from mpts.training.environments.base import ENVIRONMENTS

    predictor = draw(st.sampled_from(PREDICTORS.names()))
    rule = draw(st.sampled_from(RULES.names()))
    env_cls = ENVIRONMENTS.get("sim")
    raw = {**BASE, **draw(_section(RunConfig, BASE)), "seed": draw(st.integers(0, 5))}
    raw["env"] = {"name": "sim", **draw(_section(env_cls.Options, SMALL_ENV))}
    raw["predictor"] = {"name": predictor, **draw(_section(PREDICTORS.get(predictor).Options,
                                                          SMALL_PREDICTORS.get(predictor, {})))}
    raw["acquisition"] = {"name": rule, **draw(_section(RULES.get(rule).Options, {}))}
    return raw


def _drawn_fields(raw) -> set[str]:
    names = set()
    for key, value in raw.items():
        names |= set(value) if isinstance(value, dict) else {key}
    return names


@settings(PROPERTY, max_examples=40)
@given(raw=configs())
def test_every_config_gives_one_clean_error_or_finite_metrics(tmp_path_factory, capsys, raw):
    import yaml

    folder = tmp_path_factory.mktemp("prop")
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = folder / "run"
    code = main(["run", str(path), "--out", str(out)])
    captured = capsys.readouterr().err
    if code != 0:
        assert code == 2
        lines = captured.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), captured
        assert any(name in lines[0] for name in _drawn_fields(raw)) or "candidate pool" in lines[0], lines[0]
        if (out / "config.yaml").exists():  # refused while running: a predictor that diverged
            assert "predictor" in lines[0] and "failed at step" in lines[0], lines[0]
            event("stopped while running")
            return
        event("refused")
        return
    event("ran")
    metrics = pd.read_parquet(out / "metrics.parquet")
    trace = pd.read_parquet(out / "trace.parquet")
    assert len(metrics) == raw["steps"]
    for column in ("rollouts", "cumulative_rollouts", "effective_ratio", "train_accuracy", "wall_seconds"):
        assert np.isfinite(metrics[column]).all(), column
    assert np.isfinite(metrics["eval_accuracy"].iloc[-1])
    assert np.isfinite(trace[["pred_mean", "pred_var", "pred_p_informative"]].to_numpy()).all()
    assert trace["pred_mean"].between(0, 1).all()


# -- traces -----------------------------------------------------------------------------------------
BROKEN = [float("nan"), float("inf"), 1e30, -3, True, "x", None, 2.5]


def _column(field: pa.Field, rows: int) -> st.SearchStrategy:
    if pa.types.is_integer(field.type):
        valid = st.integers(0, 8)
    elif pa.types.is_floating(field.type):
        valid = st.floats(0, 1)
    elif pa.types.is_boolean(field.type):
        valid = st.booleans()
    else:
        valid = st.text("abc", min_size=1, max_size=3)
    return st.lists(valid, min_size=rows, max_size=rows)


@st.composite
def traces(draw):
    """A trace in the public schema (trials = 8); about half of them with a few broken cells."""
    rows = draw(st.integers(1, 12))
    extra = draw(st.lists(st.sampled_from([f for f in TRACE_SCHEMA.names if f not in REQUIRED_COLUMNS]),
                          unique=True, max_size=3))
    columns = [c for c in REQUIRED_COLUMNS if draw(st.integers(0, 20)) > 0] + extra  # now and then one is missing
    data = {name: draw(_column(TRACE_SCHEMA.field(name), rows)) for name in columns}
    if "trials" in data:
        data["trials"] = [8] * rows
    broken = [c for c in REQUIRED_COLUMNS if c in data]
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        column, row = draw(st.sampled_from(broken)), draw(st.integers(0, rows - 1))
        data[column][row] = draw(st.sampled_from(BROKEN + ([9] if column == "successes" else [])))
    return pd.DataFrame(data), draw(st.sampled_from([".csv", ".jsonl", ".parquet"]))


@PROPERTY
@given(drawn=traces())
def test_every_trace_gives_one_clean_error_or_finite_scores(tmp_path_factory, capsys, drawn):
    import json

    frame, suffix = drawn
    path = tmp_path_factory.mktemp("trace") / f"t{suffix}"
    try:
        {".csv": lambda: frame.to_csv(path, index=False),
         ".jsonl": lambda: frame.to_json(path, orient="records", lines=True),
         ".parquet": lambda: frame.to_parquet(path)}[suffix]()
    except (ValueError, TypeError, pa.ArrowException):
        return  # pandas cannot write this mixture in this format: nothing to replay
    before = path.read_bytes()
    code = main(["replay", str(path), "--predictor", "beta"])
    out, err = capsys.readouterr()
    assert path.read_bytes() == before
    if code != 0:
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and str(path) in err, err
        event("refused")
        return
    event("replayed")
    scores = json.loads(out, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    assert math.isfinite(scores["log_predictive_density"])
