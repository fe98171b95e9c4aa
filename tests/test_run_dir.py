"""Run folders: a resume checks everything before it touches a file, and nothing is ever deleted."""

import hashlib
import shutil

import pandas as pd
import pytest

import mpts.training.loop as loop
from mpts.training.cli import main
from mpts.training.config import load_config
from mpts.training.loop import run

SMALL = ["steps=12", "batch_size=16", "candidate_ratio=4", "env.num_prompts=300", "env.eval_prompts=100",
         "checkpoint_every=4", "posterior_draws_prompts=10"]


def small(*extra):
    return load_config("quickstart", SMALL + list(extra))


class Interrupt(Exception):
    pass


def stop_at(step):
    def progress(done, total, metrics):
        if done == step:
            raise Interrupt
    return progress


def snapshot(folder):
    """Every file under `folder` with its checksum: equal snapshots mean nothing was touched."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def interrupted(tmp_path, name, step, *extra):
    with pytest.raises(Interrupt):
        run(small(*extra), tmp_path / name, progress=stop_at(step))
    return tmp_path / name


def assert_same_trace(a, b):
    pd.testing.assert_frame_equal(pd.read_parquet(a / "trace.parquet"), pd.read_parquet(b / "trace.parquet"))


def test_checkpoint_of_another_predictor_is_refused_before_any_file_changes(tmp_path):
    beta = interrupted(tmp_path, "beta", 11)
    hmm = interrupted(tmp_path, "hmm", 11, "predictor={name: hmm3}")
    shutil.copy(hmm / "checkpoints" / "latest.pt", beta / "checkpoints" / "latest.pt")
    # a surplus part (written after the checkpoint) that a resume would set aside
    shutil.copy(beta / "parts" / "trace-0000004-0000007.parquet", beta / "parts" / "trace-0000009-0000010.parquet")
    before = snapshot(beta)
    with pytest.raises(ValueError, match="another config .*predictor"):
        run(None, beta, resume=True)
    assert snapshot(beta) == before


def test_environment_failing_at_resume_leaves_the_folder_whole(tmp_path, monkeypatch):
    folder = interrupted(tmp_path, "r", 2, "checkpoint_every=50")  # stopped before its first checkpoint
    before = snapshot(folder)
    assert "config.yaml" in before

    def broken(config, run_dir):
        raise ValueError("environment cannot be built")
    monkeypatch.setattr(loop, "build_environment", broken)
    with pytest.raises(ValueError, match="cannot be built"):
        run(None, folder, resume=True)
    assert snapshot(folder) == before


def test_environment_failing_on_a_new_run_creates_nothing(tmp_path, monkeypatch):
    def broken(config, run_dir):
        raise ValueError("environment cannot be built")
    monkeypatch.setattr(loop, "build_environment", broken)
    with pytest.raises(ValueError):
        run(small(), tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_corrupt_part_is_found_before_the_resume_runs_and_rollback_recovers(tmp_path):
    reference = tmp_path / "whole"
    run(small(), reference)
    folder = interrupted(tmp_path, "r", 10)
    bad = folder / "parts" / "trace-0000004-0000007.parquet"
    bad.write_bytes(b"\x13\x37 random bytes" * 40)
    before = snapshot(folder)
    with pytest.raises(ValueError, match=r"trace-0000004-0000007.parquet is corrupt.*--rollback-to 4"):
        run(None, folder, resume=True)
    assert snapshot(folder) == before

    run(None, folder, resume=True, rollback_to=4)
    assert_same_trace(reference, folder)
    [kept] = (folder / "parts" / ".orphaned").rglob(bad.name)  # set aside, not deleted
    assert kept.read_bytes() == b"\x13\x37 random bytes" * 40


def test_parts_written_after_the_last_checkpoint_are_set_aside_not_deleted(tmp_path, monkeypatch):
    reference = tmp_path / "whole"
    run(small(), reference)
    real_save = loop.RunFolder.checkpoint

    def crash_after_flush(self, step, state, steps_total):
        if step == 7:
            self.flush(step)  # rows of steps 4-7 reach parts/, the checkpoint does not
            raise Interrupt
        real_save(self, step, state, steps_total)
    monkeypatch.setattr(loop.RunFolder, "checkpoint", crash_after_flush)
    with pytest.raises(Interrupt):
        run(small(), tmp_path / "r")
    monkeypatch.undo()
    surplus = (tmp_path / "r" / "parts" / "trace-0000004-0000007.parquet").read_bytes()
    run(None, tmp_path / "r", resume=True)
    assert_same_trace(reference, tmp_path / "r")
    [kept] = (tmp_path / "r" / "parts" / ".orphaned").rglob("trace-0000004-0000007.parquet")
    assert kept.read_bytes() == surplus


def test_rollback_of_a_finished_run_sets_its_tables_aside_and_reproduces_them(tmp_path):
    folder = tmp_path / "r"
    run(small(), folder)
    finished = (folder / "trace.parquet").read_bytes()
    run(None, folder, resume=True, rollback_to=6)
    assert (folder / "trace.parquet").read_bytes() == finished  # deterministic redo of steps 4..11
    assert [p.read_bytes() for p in (folder / "parts" / ".orphaned").rglob("trace.parquet")] == [finished]
    run(None, folder, resume=True, rollback_to=0)  # before every checkpoint: from the start
    assert (folder / "trace.parquet").read_bytes() == finished


def test_missing_part_names_the_file(tmp_path):
    folder = interrupted(tmp_path, "r", 10)
    (folder / "parts" / "metrics-0000000-0000003.parquet").rename(tmp_path / "elsewhere.parquet")
    with pytest.raises(ValueError, match=r"metrics-0000000-0000003.parquet is missing.*--rollback-to 0"):
        run(None, folder, resume=True)


def test_out_naming_a_file_is_one_line_exit_2(tmp_path, capsys):
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    assert main(["run", "quickstart", "--out", str(target), "--set", "steps=2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file" in err and "Traceback" not in err
    assert target.read_text() == "keep me"
    assert main(["run", "quickstart", "--out", str(target / "sub"), "--set", "steps=2"]) == 2
    assert "is a file" in capsys.readouterr().err


def test_resume_and_rollback_from_the_command_line(tmp_path, capsys):
    folder = interrupted(tmp_path, "r", 10)
    (folder / "parts" / "trace-0000004-0000007.parquet").write_bytes(b"junk")
    assert main(["run", "--resume", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--rollback-to 4" in err
    assert main(["run", "--resume", str(folder), "--rollback-to", "4"]) == 0
    assert main(["run", "quickstart", "--rollback-to", "4"]) == 2


def recorded_step(step, rows=3):
    """A step's rows as every way in builds them (recorder.trace_rows / step_metrics)."""
    import numpy as np
    import torch

    from mpts.inference.schema import PREDICTION_COLUMNS
    from mpts.training.recorder import step_metrics, trace_rows

    successes, trials = torch.tensor([1.0, 0.0, 4.0][:rows]), torch.full((rows,), 4.0)
    failed = torch.zeros(rows, dtype=torch.bool)
    columns = {name: np.full(rows, 0.5) for name in PREDICTION_COLUMNS}
    trace = trace_rows(step, torch.arange(rows) + 10 * step, successes, trials, columns, "uniform", failed=failed)
    metrics = step_metrics(step, successes, trials, failed, rollouts=4 * rows, cumulative_rollouts=4 * rows * (step + 1),
                           wall_seconds=float(step), seconds={"predict": 0.0}, diagnostics={})
    return trace, metrics


def test_the_recorder_writes_each_step_once_in_parts_of_bounded_size(tmp_path):
    from mpts.training.recorder import RunRecorder

    recorder = RunRecorder(tmp_path / "r", flush_rows=6, flush_seconds=float("inf"))
    recorder.folder.create("name: t\n")
    for step in range(5):
        recorder.add_step(step, *recorded_step(step))
    spans = [(p.kind, p.first, p.last, p.rows) for p in recorder.folder.manifest()]
    # a part as soon as 6 rows are buffered; step 4 waits in memory
    assert spans == [("metrics", 0, 1, 2), ("trace", 0, 1, 6), ("metrics", 2, 3, 2), ("trace", 2, 3, 6)]
    first = snapshot(tmp_path / "r" / "parts")["trace-0000000-0000001.parquet"]
    recorder.checkpoint(5 - 1, {"selector": {}}, 6)  # a checkpoint writes what is buffered, then the state
    recorder.add_step(5, *recorded_step(5))
    assert [p.last for p in recorder.folder.manifest()][-1] == 4 and recorder.folder.checkpoint_steps() == [4]
    summary = recorder.finish(lambda trace, metrics: {"rows": len(trace), "steps": len(metrics)}, {}, None, 6, 6)
    assert summary == {"rows": 18, "steps": 6}
    assert snapshot(tmp_path / "r" / "parts")["trace-0000000-0000001.parquet"] == first  # never rewritten
    trace = pd.read_parquet(tmp_path / "r" / "trace.parquet")
    assert trace["step"].tolist() == [s for s in range(6) for _ in range(3)] and trace["kept"].all()
    metrics = pd.read_parquet(tmp_path / "r" / "metrics.parquet")
    assert metrics["nonfinite_rewards"].tolist() == [0] * 6 and metrics["effective_ratio"].tolist() == pytest.approx([1 / 3] * 6)
    # and a resume from the checkpoint at step 4 keeps exactly the parts up to it
    plan = RunRecorder(tmp_path / "r").folder.plan_resume()
    assert plan.step == 4 and [p.last for p in plan.keep] == [1, 1, 3, 3, 4, 4]


def test_the_recorder_writes_a_part_when_time_has_passed(tmp_path):
    from mpts.training.recorder import RunRecorder

    recorder = RunRecorder(tmp_path / "r", flush_rows=10**6, flush_seconds=0.0)
    recorder.folder.create("name: t\n")
    for step in range(3):
        recorder.add_step(step, *recorded_step(step))
    assert [(p.first, p.last) for p in recorder.folder.manifest() if p.kind == "trace"] == [(0, 0), (1, 1), (2, 2)]
