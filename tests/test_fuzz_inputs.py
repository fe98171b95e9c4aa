"""Fuzzing the edges a hostile or careless user reaches (issue 21.8): generated YAML structures
(aliases, self-references, nested lists/maps, binary, empty documents) for every `--set` key and
for a resumed run's config.yaml, and hostile replay inputs (mixed-type ids, malformed lines,
huge counts, binary). Property: the command line answers 0 or 2, never a traceback, and a 2 is
one line. main() runs in-process; the run itself is stubbed out (only the input handling is
under test), so the whole file takes seconds.
"""

from __future__ import annotations

import json
import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpts.training import loop, run_dir
from mpts.training.cli import main
from mpts.training.config import AblationConfig, RunConfig

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

SET_KEYS = sorted([*RunConfig.model_fields, *(f"ablation.{k}" for k in AblationConfig.model_fields),
                   "predictor.name", "predictor.decay", "acquisition.name", "acquisition.target",
                   "env.name", "env.num_prompts", "env.eval_prompts"])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=8), st.sampled_from(["beta", "sim", "thompson_target", "1e999", ".nan"]))
structures = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(string.ascii_lowercase, max_size=6), inner, max_size=4)),
    max_leaves=12)
HOSTILE_YAML = ["&a [*a]", "&a {x: *a}", "&a {x: [1, *a]}", "[&a [*a], 2]", "", "---\n---\n", "---\n...\n",
                "[", "{a: 1", "a: b: c", "!!python/object/apply:os.system ['true']", "!!binary AAEC",
                "[" * 200 + "]" * 200, "*undefined", "? [1, 2]\n: x", "\t- 1", "\x00\x01"]
yaml_texts = st.one_of(st.sampled_from(HOSTILE_YAML), structures.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip()),
                       st.binary(max_size=24).map(lambda b: b.decode("latin-1")))


def _assert_clean(code: int, capsys) -> None:
    err = capsys.readouterr().err
    assert code in (0, 2), code
    assert "Traceback" not in err
    if code == 2:
        assert err.startswith("error:") and err.count("\n") == 1, err
        assert len(err.split()) >= 4, err  # says what is wrong (not `error: utf-8`, `error: 28`)


@pytest.fixture
def no_run(monkeypatch):
    """The run itself is not under test: a config that validates returns at once."""
    summary = {"predictor": "beta", "acquisition": "thompson_target", "seed": 0}
    monkeypatch.setattr(loop, "run", lambda *args, **kwargs: summary)


@pytest.mark.parametrize("key", SET_KEYS)
@settings(FUZZ, max_examples=12)
@given(value=yaml_texts)
def test_any_set_value_is_accepted_or_one_line(no_run, tmp_path, capsys, key, value):
    _assert_clean(main(["run", "quickstart", "--set", f"{key}={value}", "--out", str(tmp_path / "r")]), capsys)


class _Stop(ValueError):
    pass


@FUZZ
@given(text=st.one_of(yaml_texts.map(str.encode), st.binary(max_size=64),
                      structures.map(lambda v: yaml.safe_dump({"steps": 2, "extra": v}).encode())))
def test_any_resumed_config_yaml_is_accepted_or_one_line(monkeypatch, tmp_path_factory, capsys, text):
    def stop(self, rollback_to=None):
        raise _Stop("config read; the resume itself is not under test")

    monkeypatch.setattr(run_dir.RunFolder, "plan_resume", stop)
    folder = tmp_path_factory.mktemp("run")
    (folder / "config.yaml").write_bytes(text)
    _assert_clean(main(["run", "--resume", str(folder)]), capsys)
    assert (folder / "config.yaml").read_bytes() == text


ids = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=True), st.text(max_size=6), st.booleans(),
                st.none(), st.sampled_from(["007", "7.0", "1e2", "NA", "nan", "NULL", ""]))
counts = st.one_of(st.integers(0, 8), st.integers(-5, 10**30), st.floats(allow_nan=True), st.none(),
                   st.booleans(), st.text(max_size=3))
records = st.lists(st.fixed_dictionaries({"step": st.one_of(st.integers(0, 3), counts), "prompt_id": ids,
                                          "successes": counts, "trials": counts}), min_size=0, max_size=8)


def _jsonl(rows, junk: bytes) -> bytes:
    lines = [json.dumps(r, allow_nan=True).encode() for r in rows]
    return b"\n".join(lines[: len(lines) // 2] + ([junk] if junk else []) + lines[len(lines) // 2:]) + b"\n"


def _csv(rows, junk: bytes) -> bytes:
    lines = [b"step,prompt_id,successes,trials"] + [
        ",".join("" if v is None else str(v) for v in r.values()).encode() for r in rows]
    return b"\n".join(lines + ([junk] if junk else [])) + b"\n"


@FUZZ
@given(rows=records, junk=st.one_of(st.just(b""), st.binary(max_size=12), st.sampled_from([b"{", b"1,2", b'"'])),
       suffix=st.sampled_from([".csv", ".jsonl"]))
def test_any_replay_input_is_scored_or_one_line(tmp_path_factory, capsys, rows, junk, suffix):
    path = tmp_path_factory.mktemp("log") / f"log{suffix}"
    path.write_bytes((_csv if suffix == ".csv" else _jsonl)(rows, junk))
    _assert_clean(main(["replay", str(path), "--predictor", "beta"]), capsys)
