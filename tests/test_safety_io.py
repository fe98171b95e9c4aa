"""Inputs and outputs are safe: --out never replaces inputs or runs, ids are labels, any run
folder replays, prompt texts are kept, and bad configs are one line (issues 19 and 21)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mpts.reports.output_paths import REPORT_MARKER, OutputRefused, check_report_folder
from mpts.training.cli import _one_line, main
from mpts.training.logs import read_log, replay_pool
from mpts.training.replay import read_trace

TRACE = pd.DataFrame({"step": [0, 0, 1, 1, 2], "prompt_id": [0, 1, 0, 2, 0],
                      "successes": [2, 8, 3, 0, 4], "trials": [4, 8, 4, 8, 4]})


def one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def run_folder(path):
    """A run folder as the TRL adapter writes it: no parts, no manifest."""
    path.mkdir()
    (path / "config.yaml").write_text("name: trl\n")
    TRACE.to_parquet(path / "trace.parquet")
    pd.DataFrame({"step": [0]}).to_parquet(path / "metrics.parquet")
    (path / "summary.json").write_text("{}")
    return path


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- issue 21.2: --out never replaces an input, a run's files or someone else's file ------------

def test_replay_out_refuses_its_input_a_run_folder_and_foreign_files(tmp_path, capsys):
    log = tmp_path / "mylog.csv"
    TRACE.to_csv(log, index=False)
    before = log.read_bytes()
    assert main(["replay", str(log), "--predictor", "beta", "--out", str(log)]) == 2
    one_line_error(capsys, "is the input")
    assert log.read_bytes() == before

    run = run_folder(tmp_path / "run")
    files = snapshot(run)
    for out in (run / "trace.parquet", run / "scores.json", run):
        assert main(["replay", str(log), "--predictor", "beta", "--out", str(out)]) == 2
        one_line_error(capsys, "run folder")
    assert snapshot(run) == files

    foreign = tmp_path / "notes.json"
    foreign.write_text('{"mine": 1}')
    assert main(["replay", str(log), "--predictor", "beta", "--out", str(foreign)]) == 2
    one_line_error(capsys, "not scores written by mpts replay")
    assert foreign.read_text() == '{"mine": 1}'

    scores = tmp_path / "scores.json"
    for _ in range(2):  # its own earlier output may be replaced
        assert main(["replay", str(log), "--predictor", "beta", "--out", str(scores)]) == 0
    assert json.loads(scores.read_text())["rows"] == 5


def test_report_out_refuses_a_run_folder_and_foreign_folders(tmp_path, capsys):
    run = run_folder(tmp_path / "run")
    files = snapshot(run)
    for out in (run, run / "report"):
        assert main(["report", str(run), "--out", str(out)]) == 2
        one_line_error(capsys, "--out")
    assert snapshot(run) == files
    elsewhere = tmp_path / "photos"
    elsewhere.mkdir()
    (elsewhere / "cat.png").write_bytes(b"x")
    assert main(["report", str(run), "--out", str(elsewhere)]) == 2
    one_line_error(capsys, "not an earlier mpts report")
    assert snapshot(elsewhere) == {elsewhere.joinpath("cat.png").relative_to(elsewhere): b"x"}
    (elsewhere / REPORT_MARKER).write_text("")
    check_report_folder(elsewhere, [run])  # an earlier report's folder may be written again
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(OutputRefused, match="is a file"):
        check_report_folder(tmp_path / "notes.txt", [run])


# -- issue 21.3: ids are labels -------------------------------------------------------------

SPELLINGS = ["7", "007", "7.0", "1e2", "100", "NA", "nan", "NULL"]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_ids_keep_their_spelling_and_never_merge(tmp_path, suffix):
    path = tmp_path / f"log{suffix}"
    rows = pd.DataFrame({"step": 0, "prompt_id": SPELLINGS, "successes": 1, "trials": 2})
    if suffix == ".csv":
        rows.to_csv(path, index=False)
    elif suffix == ".parquet":
        rows.to_parquet(path)
    else:  # ids written as JSON numbers where they look like numbers
        lines = [f'{{"step": 0, "prompt_id": {i if i[0].isdigit() and i != "007" else json.dumps(i)}, '
                 f'"successes": 1, "trials": 2}}' for i in SPELLINGS]
        path.write_text("\n".join(lines) + "\n")
    trace = read_trace(path)
    assert len(trace) == len(SPELLINGS) and (trace["trials"] == 2).all()
    assert sorted(map(str, trace["prompt_id"])) == sorted(SPELLINGS)


def test_plain_integer_ids_stay_integers_and_empty_ids_are_refused(tmp_path, capsys):
    path = tmp_path / "t.csv"
    TRACE.to_csv(path, index=False)
    assert read_trace(path)["prompt_id"].dtype == "int64"
    path.write_text("step,prompt_id,successes,trials\n0,,1,2\n")
    assert main(["replay", str(path), "--predictor", "beta"]) == 2
    one_line_error(capsys, "'prompt_id' is empty at row 0")


def test_binary_ids_and_binary_files_are_one_line(tmp_path, capsys):
    path = tmp_path / "t.parquet"
    pd.DataFrame({"step": [0], "prompt_id": [b"\xff\xfe"], "successes": [1], "trials": [2]}).to_parquet(path)
    assert main(["replay", str(path), "--predictor", "beta"]) == 2
    one_line_error(capsys, "not UTF-8")
    for suffix in (".csv", ".jsonl"):
        path = tmp_path / f"b{suffix}"
        path.write_bytes(b"step,prompt_id,successes,trials\n0,\xff\xfe,1,2\n" if suffix == ".csv"
                         else b'{"step": 0, "prompt_id": "\xff", "successes": 1, "trials": 2}\n')
        assert main(["replay", str(path), "--predictor", "beta"]) == 2
        one_line_error(capsys, str(path), "UTF-8")


# -- issue 19.3 / 19.4: any run folder replays; texts are kept --------------------------------

def test_replay_reads_a_trl_run_folder_and_an_unfinished_run(tmp_path, capsys):
    run = run_folder(tmp_path / "run")
    assert main(["replay", str(run), "--predictor", "beta"]) == 0
    from_folder = json.loads(capsys.readouterr().out)
    assert main(["replay", str(run / "trace.parquet"), "--predictor", "beta"]) == 0
    assert json.loads(capsys.readouterr().out) == from_folder and from_folder["rows"] == 5
    unfinished = tmp_path / "unfinished"
    (unfinished / "parts").mkdir(parents=True)
    (unfinished / "config.yaml").write_text("name: x\n")
    TRACE[TRACE.step < 2].to_parquet(unfinished / "parts" / "trace-000000-000001.parquet")
    TRACE[TRACE.step == 2].to_parquet(unfinished / "parts" / "trace-000002-000002.parquet")
    assert main(["replay", str(unfinished), "--predictor", "beta"]) == 0
    assert json.loads(capsys.readouterr().out) == from_folder


def test_a_table_with_prompt_id_and_prompt_keeps_its_texts(tmp_path):
    table = pd.DataFrame({"step": [0, 0, 1, 1], "prompt_id": ["a", "b", "a", "b"],
                          "prompt": ["What is 2+2?", "Name a prime.", "What is 2+2?", "Name a prime."],
                          "reward": [1.0, 0.0, 1.0, 1.0]})
    path = tmp_path / "rollouts.csv"
    table.to_csv(path, index=False)
    trace, texts = read_log(path)
    assert texts == ("What is 2+2?", "Name a prime.")
    assert trace["successes"].tolist() == [1, 0, 1, 1]
    pool = replay_pool(trace, texts)
    assert pool is not None and tuple(pool.texts) == texts


# -- issue 21.8: config mistakes are one line, not a traceback --------------------------------

@pytest.mark.parametrize("override", ["predictor=&a [*a]", "acquisition=&a {x: *a}", "env.eval_prompts=&a [*a]",
                                      "ablation.grid=&a {predictor.decay: *a}", "plugins=5"])
def test_hostile_overrides_are_one_line(tmp_path, capsys, override):
    assert main(["run", "quickstart", "--set", override, "--out", str(tmp_path / "r")]) == 2
    one_line_error(capsys)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("content, message", [(b"", "is empty"), (b"steps: [1,\n", "not valid YAML"),
                                              (b"\xff\xfe\x00", "not UTF-8"), (b"- 1\n", "must be a mapping")])
def test_a_damaged_config_yaml_on_resume_is_one_line(tmp_path, capsys, content, message):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_bytes(content)
    assert main(["run", "--resume", str(run)]) == 2
    one_line_error(capsys, "config.yaml", message)
    assert (run / "config.yaml").read_bytes() == content


def test_a_binary_config_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"\xff\xfe\xfa")
    assert main(["run", str(path)]) == 2
    one_line_error(capsys, str(path), "not UTF-8")


def test_errno_only_os_errors_say_what_happened():
    assert "No space left on device" in _one_line(OSError(28))
    assert "codec can't decode" in _one_line(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"))


# -- issue 21.7: replay streams its input --------------------------------------------------

def test_streamed_replay_gives_the_same_scores_in_any_chunk_size(tmp_path):
    from mpts.training.replay import replay
    from mpts.training.replay_stream import replay_file

    generator = np.random.default_rng(0)
    trials = generator.integers(1, 5, 400)
    log = pd.DataFrame({"step": np.sort(generator.integers(0, 12, 400)),  # per-rollout rows, steps span chunks
                        "prompt_id": generator.choice(["a", "b", "007", "7", "x y"] + list(range(40)), 400),
                        "successes": generator.binomial(trials, 0.4), "trials": trials})
    path = tmp_path / "log.csv"
    log.to_csv(path, index=False)
    whole, _ = replay(read_trace(path), "beta", {"decay": 0.9})
    for chunk_rows in (1, 7, 64, 10**6):
        assert same(replay_file(path, "beta", {"decay": 0.9}, chunk_rows=chunk_rows), whole), chunk_rows
    shuffled = tmp_path / "shuffled.csv"  # steps out of order: read whole, same scores
    log.sample(frac=1.0, random_state=1).to_csv(shuffled, index=False)
    assert same(replay_file(shuffled, "beta", {"decay": 0.9}, chunk_rows=7), whole)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k] == b[k] or (a[k] != a[k] and b[k] != b[k]) for k in a)


def test_a_replay_that_would_not_fit_is_refused_up_front_saying_how_much(tmp_path, capsys, monkeypatch):
    from types import SimpleNamespace

    from mpts.training import memory

    path = tmp_path / "log.csv"
    TRACE.to_csv(path, index=False)
    monkeypatch.setattr(memory.psutil, "virtual_memory", lambda: SimpleNamespace(available=100))  # state fits, rows not
    assert main(["replay", str(path), "--predictor", "beta", "--out", str(tmp_path / "s.json")]) == 2
    one_line_error(capsys, "would need about", "scored rows", "available")
    assert not (tmp_path / "s.json").exists()


def test_the_memory_check_counts_scored_rows_and_refuses_what_exceeds_its_estimate(tmp_path, monkeypatch):
    """The up-front estimate counts the rows replay scores (one per step and prompt, however many
    rollout rows a log has), and the replay is refused exactly when it exceeds what is available."""
    from types import SimpleNamespace

    from mpts.training import memory, replay_stream
    from mpts.training.replay_stream import SCORED_BYTES_PER_ROW, replay_file

    rows = [(step, prompt, rollout % 2, 1) for step in range(3) for prompt in range(10) for rollout in range(4)]
    path = tmp_path / "log.csv"
    pd.DataFrame(rows, columns=["step", "prompt_id", "successes", "trials"]).to_csv(path, index=False)
    needs = []
    check_fits = replay_stream.check_fits

    def recorded(need, what, available=None):
        needs.append(need)
        return check_fits(need, what, available)
    monkeypatch.setattr(replay_stream, "check_fits", recorded)
    scores = replay_file(path, "beta", chunk_rows=7)  # steps span chunks
    assert scores["rows"] == 30
    assert needs[-1].parts["scored rows (distinct prompt ids per step)"] == 30 * SCORED_BYTES_PER_ROW
    total = needs[-1].total
    monkeypatch.setattr(memory.psutil, "virtual_memory", lambda: SimpleNamespace(available=total))
    assert replay_file(path, "beta", chunk_rows=7)["rows"] == 30
    monkeypatch.setattr(memory.psutil, "virtual_memory", lambda: SimpleNamespace(available=total - 1))
    with pytest.raises(memory.NotEnoughMemory, match="would need about .* scored rows"):
        replay_file(path, "beta", chunk_rows=7)
