"""A run folder is data: loading one runs nothing, writes never follow links planted in it, a full
disk or a second writer is one line that changes nothing, and a lost `latest.pt` costs no steps."""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import signal
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
import torch

import mpts.training.run_dir as run_dir
from mpts.training.cli import main
from mpts.training.config import load_config
from mpts.training.loop import run
from mpts.training.run_dir import RunFolder

SMALL = ["steps=12", "batch_size=16", "candidate_ratio=4", "env.num_prompts=300", "env.eval_prompts=100",
         "checkpoint_every=4", "posterior_draws_prompts=10"]
LOCK_HOLDER = textwrap.dedent("""
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("locked", flush=True)
    sys.stdin.read()
""")


class Interrupt(Exception):
    pass


class RunsCode:
    """Unpickling this creates `marker`: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def small(*extra):
    return load_config("quickstart", SMALL + list(extra))


def interrupted(folder, done=11, *extra):
    """Stopped after `done` steps: checkpoints at steps 3 and 7, parts for steps 8-10 after them."""
    def stop(finished, total, metrics):
        if finished == done:
            raise Interrupt
    with pytest.raises(Interrupt):
        run(small(*extra), folder, progress=stop)
    return folder


def snapshot(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def replace_file(path, data: bytes):
    """New contents under `path` without touching the file it was (latest.pt is a hard link)."""
    path.unlink(missing_ok=True)
    path.write_bytes(data)


def crafted_checkpoint(marker, bare_pickle=False) -> bytes:
    state = {"step": 7, "payload": RunsCode(marker)}
    if bare_pickle:
        return pickle.dumps(state)
    import io
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


# -- 1. nothing runs on load ----------------------------------------------------------------------
@pytest.mark.parametrize("bare_pickle", [False, True], ids=["torch_zip", "bare_pickle"])
def test_a_crafted_checkpoint_is_refused_without_running_it(tmp_path, capsys, bare_pickle):
    folder = interrupted(tmp_path / "r")
    marker = tmp_path / "marker"
    replace_file(folder / "checkpoints" / "latest.pt", crafted_checkpoint(marker, bare_pickle))
    before = snapshot(folder)
    assert main(["run", "--resume", str(folder)]) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert len(err.strip().splitlines()) == 1 and "latest.pt" in err and "not loaded" in err, err
    assert snapshot(folder) == before


def test_an_ablation_over_a_run_with_a_crafted_checkpoint_runs_nothing(tmp_path):
    from grid_helpers import TINY

    from mpts.training.ablate import RunsFailed, ablate
    from mpts.training.config import validate_config

    config = validate_config({**TINY, "ablation": {"seeds": [0], "workers": 1,
                                                    "arms": [{"predictor": "beta", "acquisition": "uniform"}]}})
    stopped = tmp_path / "abl" / "runs" / "beta__uniform__seed0"
    def stop(done, total, metrics):
        if done == 3:
            raise Interrupt
    with pytest.raises(Interrupt):
        run(validate_config({**TINY, "acquisition": {"name": "uniform"}}), stopped, progress=stop)
    marker = tmp_path / "marker"
    replace_file(stopped / "checkpoints" / "latest.pt", crafted_checkpoint(marker))
    with pytest.raises(RunsFailed, match="not loaded"):
        ablate(config, tmp_path / "abl", show_progress=False)
    assert not marker.exists()


def test_the_verl_selector_state_is_read_without_running_it(tmp_path):
    from mpts.integrations.verl_selection import VerlSelectionError, read_selector_state, write_selector_state

    state = {"steps_done": 2, "selector": {"predictor": {"alpha": torch.ones(3)}, "ids": ["a", 7]},
             "cumulative_rollouts": 16, "wall_seconds": 0.5}
    write_selector_state(state, tmp_path / "good.pt")
    loaded = read_selector_state(tmp_path / "good.pt")
    assert loaded["selector"]["ids"] == ["a", 7] and torch.equal(loaded["selector"]["predictor"]["alpha"], torch.ones(3))
    marker = tmp_path / "marker"
    for bare in (False, True):
        (tmp_path / "bad.pt").write_bytes(crafted_checkpoint(marker, bare))
        with pytest.raises(VerlSelectionError, match="bad.pt holds objects other than tensors"):
            read_selector_state(tmp_path / "bad.pt")
    assert not marker.exists()


# -- 10. a lost or damaged latest.pt -------------------------------------------------------------
def test_a_deleted_or_damaged_latest_checkpoint_resumes_from_the_newest_intact_step(tmp_path):
    run(small(), tmp_path / "whole")
    folder = interrupted(tmp_path / "r")
    (folder / "checkpoints" / "latest.pt").unlink()
    assert RunFolder(folder).plan_resume().step == 7
    replace_file(folder / "checkpoints" / "latest.pt", b"PK\x03\x04 truncated")
    assert RunFolder(folder).plan_resume().step == 7
    replace_file(folder / "checkpoints" / "step-0000007.pt", b"")
    assert RunFolder(folder).plan_resume().step == 3  # step 7's is damaged too: the one before it
    run(None, folder, resume=True)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "whole" / "trace.parquet"),
                                  pd.read_parquet(folder / "trace.parquet"))
    orphaned = [p.name for p in (folder / "parts" / ".orphaned").rglob("*.parquet")]
    assert orphaned and all(int(name.split("-")[1]) >= 4 for name in orphaned), orphaned  # steps 0-3 were kept


# -- 4. writes never follow planted links ----------------------------------------------------------
def test_links_planted_under_temporary_and_final_names_are_never_written_through(tmp_path):
    folder = interrupted(tmp_path / "r")
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's file")
    planted = ["progress.json.tmp", "summary.json.tmp", "trace.parquet.tmp", "parts/manifest.json.tmp",
               "parts/trace-0000008-0000011.parquet.tmp", "parts/metrics-0000008-0000011.parquet.tmp",
               "checkpoints/step-0000011.pt.tmp", "checkpoints/latest.pt.tmp", "checkpoints/predictor_final.pt"]
    for name in planted:
        (folder / name).symlink_to(victim)
    run(None, folder, resume=True)
    assert victim.read_text() == "the user's file"
    assert (folder / "summary.json").is_file()
    assert not (folder / "checkpoints" / "predictor_final.pt").is_symlink()  # the link was replaced, not followed


@pytest.mark.parametrize("linked", ["parts", "checkpoints"])
def test_a_linked_parts_or_checkpoints_folder_is_refused(tmp_path, capsys, linked):
    folder = interrupted(tmp_path / "r")
    elsewhere = tmp_path / "elsewhere"
    (folder / linked).rename(elsewhere)
    (folder / linked).symlink_to(elsewhere)
    before = snapshot(elsewhere)
    assert main(["run", "--resume", str(folder)]) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert snapshot(elsewhere) == before


# -- 5. a full disk ------------------------------------------------------------------------------
def test_a_full_disk_mid_run_is_one_line_and_leaves_no_temporary_file(tmp_path, capsys, monkeypatch):
    save = torch.save
    calls = []

    def fills_the_disk(obj, handle, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint: after some bytes, the disk is full
            handle.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fills_the_disk)
    folder = tmp_path / "r"
    assert main(["run", "quickstart", "--out", str(folder), *[x for s in SMALL for x in ("--set", s)]]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no space left" in err and "step-0000007.pt" in err, err
    assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]
    monkeypatch.setattr(torch, "save", save)
    assert RunFolder(folder).plan_resume().step == 3  # the folder is whole: it resumes from step 3


def test_a_resume_without_free_space_changes_nothing(tmp_path, capsys, monkeypatch):
    folder = interrupted(tmp_path / "r")  # parts for steps 8-10 would be set aside
    before = snapshot(folder)
    monkeypatch.setattr(run_dir.shutil, "disk_usage", lambda path: run_dir.shutil._ntuple_diskusage(10**9, 10**9, 0))
    assert main(["run", "--resume", str(folder)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no space left" in err and str(folder) in err, err
    assert snapshot(folder) == before


def test_a_resume_whose_manifest_write_fills_the_disk_moves_nothing(tmp_path, capsys, monkeypatch):
    folder = interrupted(tmp_path / "r")
    before = snapshot(folder)
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: FullDisk(real_fdopen(fd, *a, **k)))
    assert main(["run", "--resume", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "no space left" in err and "manifest.json" in err, err
    assert snapshot(folder) == before
    assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


# -- 9. one writer at a time ---------------------------------------------------------------------
def test_a_second_writer_is_refused_while_a_process_holds_the_lock_and_a_dead_holders_lock_is_recovered(
        tmp_path, capsys):
    folder = interrupted(tmp_path / "r")
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(folder / ".lock")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        before = snapshot(folder)
        for extra in ([], ["--rollback-to", "0"]):
            assert main(["run", "--resume", str(folder), *extra]) == 2
            err = capsys.readouterr().err
            assert len(err.strip().splitlines()) == 1 and "another process" in err, err
            assert snapshot(folder) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert main(["run", "--resume", str(folder)]) == 0  # the killed holder's lock went with it
    assert (folder / "summary.json").is_file()


def test_a_planted_lock_link_is_refused_and_a_file_system_without_locks_still_runs(tmp_path, capsys, monkeypatch,
                                                                                   caplog):
    import mpts.training.run_lock as run_lock

    folder = interrupted(tmp_path / "r")
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's file")
    (folder / ".lock").unlink()
    (folder / ".lock").symlink_to(victim)
    assert main(["run", "--resume", str(folder)]) == 2
    assert "lock" in capsys.readouterr().err and victim.read_text() == "the user's file"
    (folder / ".lock").unlink()

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(run_lock.fcntl, "flock", no_locks)
    run(None, folder, resume=True)  # some network mounts cannot lock: the run goes on, with a warning
    assert "cannot lock files" in caplog.text and (folder / "summary.json").is_file()


def test_a_run_holds_its_folder_lock_while_it_writes(tmp_path):
    probe = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
             "try: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError: sys.exit(3)")
    seen = []

    def progress(done, total, metrics):
        if done == 5:
            seen.append(subprocess.run([sys.executable, "-c", probe, str(tmp_path / "r" / ".lock")]).returncode)
    run(small(), tmp_path / "r", progress=progress)
    assert seen == [3]  # held by the run
    assert subprocess.run([sys.executable, "-c", probe, str(tmp_path / "r" / ".lock")]).returncode == 0


# -- 11. the default run folder stays under runs/ ------------------------------------------------
@pytest.mark.parametrize("name", ["../../escaped", "ABSOLUTE", "a/b", "..\\x"])
@pytest.mark.parametrize("command", ["run", "ablate"])
def test_a_config_name_that_is_a_path_is_refused(tmp_path, capsys, monkeypatch, name, command):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    name = str(tmp_path / "absolute") if name == "ABSOLUTE" else name
    monkeypatch.chdir(work)
    sets = [x for s in SMALL + ["steps=1", f"name={name}", "ablation.seeds=[0]", "ablation.workers=1"]
            for x in ("--set", s)]
    assert main([command, "quickstart", *sets]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "name" in err and "--out" in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["a"] and list(work.iterdir()) == []


def test_the_ray_driver_neither_writes_through_nor_ships_a_planted_link(tmp_path):
    from mpts.training.executors.work import read_folder, write_folder

    victim = tmp_path / "victim.txt"
    victim.write_text("the user's file")
    folder = tmp_path / "run"
    (folder / "parts").mkdir(parents=True)
    (folder / "summary.json.tmp").symlink_to(victim)
    (folder / "parts" / "manifest.json.tmp").symlink_to(victim)
    (folder / "config.yaml").symlink_to(victim)
    write_folder(folder, {"summary.json": b"{}", "parts/manifest.json": b"{}", "config.yaml": b"name: x"})
    assert victim.read_text() == "the user's file"
    (folder / "secret").symlink_to(victim)
    (folder / ".lock").touch()  # the folder's own lock is not part of the run either
    assert set(read_folder(folder)) == {"summary.json", "parts/manifest.json", "config.yaml"}


def test_re_running_an_ablation_does_not_write_through_a_linked_table(tmp_path):
    from grid_helpers import TINY

    from mpts.training.ablate import ablate
    from mpts.training.config import validate_config

    config = validate_config({**TINY, "ablation": {"seeds": [0], "workers": 1,
                                                    "arms": [{"predictor": "beta", "acquisition": "uniform"}]}})
    ablate(config, tmp_path / "abl", show_progress=False)
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's file")
    for name in ("table.md", "runs.parquet"):
        (tmp_path / "abl" / name).unlink()
        (tmp_path / "abl" / name).symlink_to(victim)
    ablate(config, tmp_path / "abl", show_progress=False)
    assert victim.read_text() == "the user's file"
    assert not (tmp_path / "abl" / "table.md").is_symlink()


def test_a_resumed_config_imports_only_the_plugins_the_user_names(tmp_path, monkeypatch, capsys):
    """A run folder's config.yaml is data: a plugin it names (code) is not imported on resume
    unless the user names it with --plugin."""
    import sys

    marker = tmp_path / "plugin-ran"
    (tmp_path / "planted_plugin_mod.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    run = tmp_path / "run"
    assert main(["run", "quickstart", "--out", str(run), "--set", "steps=3", "--set", "env.num_prompts=100", "--set", "batch_size=8",
                     "--set", "checkpoint_every=1"]) == 0
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("plugins: []", "plugins:\n- planted_plugin_mod"))
    capsys.readouterr()
    assert main(["run", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "planted_plugin_mod" in err and "--plugin planted_plugin_mod" in err and err.count("\n") == 1
    assert not marker.exists() and "planted_plugin_mod" not in sys.modules
    # named by the user: imported (and the resume goes on)
    main(["run", "--resume", str(run), "--plugin", "planted_plugin_mod"])
    assert marker.exists()
