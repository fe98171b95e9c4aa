"""One validation layer: every number of every config section, CLI flag and replay input.

The cases are generated from the schemas themselves (every numeric field of every registered
component), so a new option is covered without editing this file.
"""

import json
import time
import typing

import numpy as np
import pandas as pd
import pytest

from mpts.models.options import admits_bool
from mpts.models.registry import PREDICTORS
from mpts.training.acquisition import RULES
from mpts.training.cli import main
from mpts.training.config import RunConfig, load_config
from mpts.training.environments.base import ENVIRONMENTS

SECTIONS = {"predictor": PREDICTORS, "acquisition": RULES, "env": ENVIRONMENTS}


def _numeric(annotation) -> str | None:
    """'int' / 'float' for a field that takes a plain number (possibly optional), else None."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    if float in args:
        return "float"
    if int in args and not admits_bool(annotation):
        return "int"
    return None


def numeric_options():
    """(the --set prefix, component name or None, field, 'int'/'float') for every number in every schema."""
    for field, info in RunConfig.model_fields.items():
        if (kind := _numeric(info.annotation)) is not None:
            yield "", None, field, kind
    for section, registry in SECTIONS.items():
        for name in registry.names():
            for field, info in registry.get(name).Options.model_fields.items():
                if (kind := _numeric(info.annotation)) is not None:
                    yield f"{section}.", name, field, kind


NUMERIC = list(numeric_options())
FLOATS = [case for case in NUMERIC if case[3] == "float"]


def _args(tmp_path, prefix, name, field, value):
    section = prefix.rstrip(".")
    name_set = ["--set", f"{section}.name={name}"] if name else []
    return ["run", "quickstart", "--out", str(tmp_path / "never"), *name_set, "--set", f"{prefix}{field}={value}"]


def assert_one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_every_number_in_every_schema_is_covered():
    assert len(NUMERIC) > 60 and len(FLOATS) > 30
    assert ("", None, "steps", "int") in NUMERIC and ("predictor.", "beta", "decay", "float") in NUMERIC


@pytest.mark.parametrize("prefix, name, field, kind", NUMERIC, ids=lambda v: str(v))
def test_a_boolean_is_not_a_number_anywhere(tmp_path, capsys, prefix, name, field, kind):
    assert main(_args(tmp_path, prefix, name, field, "true")) == 2
    assert_one_line_error(capsys, field, "not a boolean")
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
@pytest.mark.parametrize("prefix, name, field, kind", FLOATS, ids=lambda v: str(v))
def test_nan_and_inf_are_refused_by_every_float_option(tmp_path, capsys, prefix, name, field, kind, value):
    assert main(_args(tmp_path, prefix, name, field, value)) == 2
    assert_one_line_error(capsys, field)


@pytest.mark.parametrize("override, needle", [
    ("seed=1.0e+29", "seed"), ("seed=-1", "seed"), ("k=1000000000000", "k"),
    ("env.num_prompts=1000000000000", "env.num_prompts"),
    ("predictor={name: id_vae, hash_buckets: 2000000000, embedding_dim: 64}", "id_vae"),
])
def test_huge_sizes_are_refused_up_front_naming_the_option(tmp_path, capsys, override, needle):
    start = time.perf_counter()
    assert main(["run", "quickstart", "--out", str(tmp_path / "never"), "--set", override]) == 2
    assert time.perf_counter() - start < 30
    assert_one_line_error(capsys, needle)
    assert not (tmp_path / "never").exists()


def test_memory_error_says_how_much_would_be_needed(tmp_path, capsys):
    assert main(["run", "quickstart", "--out", str(tmp_path / "x"), "--set", "env.num_prompts=1000000000000"]) == 2
    assert_one_line_error(capsys, "would need about", "GiB", "available", "lower env.num_prompts")


def test_switching_a_component_drops_the_old_options(tmp_path):
    config = load_config("quickstart", ["predictor.name=id_vae"])  # quickstart.yaml sets beta's decay: 0.9
    assert config.predictor.name == "id_vae" and "decay" not in config.predictor.options
    # options given with the new name survive, whatever their order on the command line
    config = load_config("quickstart", ["predictor.lr=0.01", "predictor.name=id_vae"])
    assert config.predictor.options == {"lr": 0.01}
    assert load_config("quickstart", ["predictor=hmm3"]).predictor.name == "hmm3"
    # the same name keeps its options
    assert load_config("quickstart", ["predictor.decay=0.7", "predictor.name=beta"]).predictor.options["decay"] == 0.7


# -- replay inputs ---------------------------------------------------------------------------------
TRACE = pd.DataFrame({"step": [0, 0, 1, 1, 2], "prompt_id": [0, 1, 0, 2, 0],
                      "successes": [2, 8, 3, 0, 4], "trials": [4, 8, 4, 8, 4]})


def _strict_json(text):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def test_replay_json_is_valid_json_with_null_and_nothing_lands_in_the_cwd(tmp_path, capsys, monkeypatch):
    path = tmp_path / "trace.parquet"
    TRACE.to_parquet(path)  # no true_p: the truth-based scores are undefined
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["replay", str(path), "--predictor", "beta"]) == 0
    printed = _strict_json(capsys.readouterr().out)
    assert printed["rows"] == 5 and None in printed.values()
    assert list(work.iterdir()) == []
    out = tmp_path / "scores.json"
    assert main(["replay", str(path), "--predictor", "beta", "--out", str(out)]) == 0
    assert _strict_json(out.read_text()) == printed


def test_replay_ids_are_labels_not_indices(tmp_path):
    from mpts.training.replay import read_trace, replay

    path = tmp_path / "t.csv"
    TRACE.assign(prompt_id=TRACE.prompt_id * 10**12 - 7).to_csv(path, index=False)
    start = time.perf_counter()
    scores, table = replay(read_trace(path), "beta")
    assert time.perf_counter() - start < 10
    assert set(table.prompt_id) == {-7, 10**12 - 7, 2 * 10**12 - 7}
    baseline, _ = replay(read_trace_from(tmp_path, TRACE), "beta")
    assert np.isclose(scores["log_predictive_density"], baseline["log_predictive_density"])


def read_trace_from(tmp_path, frame):
    from mpts.training.replay import read_trace

    path = tmp_path / "plain.csv"
    frame.to_csv(path, index=False)
    return read_trace(path)


@pytest.mark.parametrize("column, value", [("successes", 1e30), ("trials", 1e30), ("step", 1e30),
                                           ("successes", True)])
def test_replay_huge_or_boolean_counts_name_file_and_column(tmp_path, capsys, column, value):
    path = tmp_path / "bad.jsonl"
    frame = TRACE.astype(object)
    frame.loc[3, column] = value
    frame.to_json(path, orient="records", lines=True)
    assert main(["replay", str(path), "--predictor", "beta"]) == 2
    assert_one_line_error(capsys, str(path), repr(column))


def test_replay_bad_option_and_folder_as_trace_are_one_line(tmp_path, capsys):
    path = tmp_path / "trace.parquet"
    TRACE.to_parquet(path)
    assert main(["replay", str(path), "--predictor", "beta", "--set", "decay=.nan"]) == 2
    assert_one_line_error(capsys, "decay", "finite")
    assert main(["replay", str(path), "--predictor", "beta", "--set", "decay=true"]) == 2
    assert_one_line_error(capsys, "decay", "boolean")
    (tmp_path / "empty").mkdir()  # a folder without a trace is read as a verl dump
    assert main(["replay", str(tmp_path / "empty"), "--predictor", "beta"]) == 2
    assert_one_line_error(capsys, str(tmp_path / "empty"), "no verl rollout dump files")
    assert main(["replay", str(path), "--predictor", "beta", "--out", str(tmp_path)]) == 2
    assert_one_line_error(capsys, "is a folder")


def test_a_diverging_predictor_stops_with_one_line_naming_it(tmp_path, capsys, monkeypatch):
    from mpts.models.beta_bernoulli import BetaBernoulli

    def diverge(self, *args, **kwargs):
        raise FloatingPointError("SVI produced a non-finite loss (inf)")
    monkeypatch.setattr(BetaBernoulli, "observe", diverge)
    assert main(["run", "quickstart", "--out", str(tmp_path / "r"), "--set", "steps=3",
                 "--set", "predictor.decay=0.5"]) == 2
    assert_one_line_error(capsys, "predictor beta failed at step 0", "non-finite loss", "decay")
    assert (tmp_path / "r" / "config.yaml").exists()  # the run's folder stays, for a look or a resume


def test_learning_rates_have_a_documented_range(tmp_path, capsys):
    assert main(["run", "quickstart", "--out", str(tmp_path / "r"), "--set", "predictor={name: id_vae, lr: 2.0}"]) == 2
    assert_one_line_error(capsys, "lr", "less than or equal to 1")


@pytest.mark.parametrize("argv, needle", [
    (["bench", "--steps", "true"], "--steps"), (["bench", "--pool", "0"], "--pool"),
    (["bench", "--k", "1000000000000"], "--k"), (["bench", "--background-load", "-1"], "--background-load"),
    (["replay", "t.csv", "--predictor", "beta", "--success-threshold", "nan"], "--success-threshold"),
    (["replay", "t.csv", "--predictor", "beta", "--seed", "1e29"], "--seed"),
    (["report", "r", "--out", "o", "--target-accuracy", "inf"], "--target-accuracy"),
    (["run", "--resume", "r", "--rollback-to", "-3"], "--rollback-to"),
    (["ablate", "quickstart", "--workers", "true"], "--workers"),
])
def test_numeric_flags_go_through_the_same_checks(capsys, argv, needle):
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    assert_one_line_error(capsys, needle)


def test_bench_pool_beyond_memory_is_refused_up_front(capsys):
    assert main(["bench", "--pool", "1000000000", "--predictor", "hmm3", "--steps", "1"]) == 2
    assert_one_line_error(capsys, "would need about", "--pool")
