"""Executors without Ray: the detached run (files in, files out) and the local executor's resume."""

import json

import pytest
from grid_helpers import TINY, assert_same_results, tiny_grid

from mpts.training.ablate import ablate
from mpts.training.config import validate_config
from mpts.training.executors import make_executor
from mpts.training.executors.work import read_folder, run_detached, write_folder
from mpts.training.loop import run


class Stop(Exception):
    pass


def stopped_run(folder, config, after_step):
    """A run interrupted after `after_step` steps (checkpoint_every=2 in TINY)."""
    def progress(done, total, metrics):
        if done == after_step:
            raise Stop
    with pytest.raises(Stop):
        run(config, folder, progress=progress)


def test_detached_run_resumes_a_stopped_run_from_its_files(tmp_path):
    config = validate_config({**TINY, "steps": 6})
    run(config, tmp_path / "whole")
    stopped_run(tmp_path / "stopped", config, after_step=3)
    files = read_folder(tmp_path / "stopped")
    assert "checkpoints/latest.pt" in files and "summary.json" not in files
    # the part flushed at step 3 (after the step-1 checkpoint) is dropped on resume
    output = run_detached("stopped", config.model_dump(mode="json"), files)
    assert "summary.json" in output.files and output.summary["seed"] == 0
    write_folder(tmp_path / "stopped", output.files)
    assert set(read_folder(tmp_path / "stopped")) == set(output.files)
    assert_same_results(tmp_path / "whole", tmp_path / "stopped")


def test_write_folder_refuses_paths_outside_the_folder(tmp_path):
    for bad in ("../x", "/etc/x"):
        with pytest.raises(ValueError, match="outside its folder"):
            write_folder(tmp_path / "run", {"a": b"1", bad: b"2"})
    assert not (tmp_path / "run").exists()


def test_local_ablation_completes_an_interrupted_grid(tmp_path):
    config = validate_config(tiny_grid(arms=[{"predictor": "beta", "acquisition": "uniform"}],
                                       grid={"candidate_ratio": [2, 3]}, seeds=[0]))
    out = tmp_path / "abl"
    stopped = out / "runs" / "beta__uniform__candidate_ratio=3__seed0"
    stopped_run(stopped, validate_config({**config.model_dump(mode="json"), "candidate_ratio": 3,
                                          "ablation": {**config.ablation.model_dump(), "point": {"candidate_ratio": 3}}}),
                after_step=3)
    ablate(config, out, show_progress=False)
    assert json.loads((stopped / "progress.json").read_text())["status"] == "done"
    run(validate_config({**TINY, "candidate_ratio": 3}), tmp_path / "whole")
    assert_same_results(tmp_path / "whole", stopped)


def test_unknown_executor_and_stray_address_are_refused():
    with pytest.raises(ValueError, match="unknown executor 'slurm'"):
        make_executor("slurm", workers=1)
    with pytest.raises(ValueError, match="--address is for --executor ray"):
        make_executor("local", workers=1, address="10.0.0.1:6379")


def test_a_failing_run_is_reported_and_the_others_are_kept(tmp_path, capsys):
    import yaml

    from mpts.training.cli import main

    # 20 x 8 candidates exceed the 100 prompts: that run fails when it starts, the other finishes
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(tiny_grid(arms=[{"predictor": "beta", "acquisition": "uniform"}],
                                               grid={"candidate_ratio": [2, 20]}, seeds=[0])))
    assert main(["ablate", str(config), "--out", str(tmp_path / "abl")]) == 1
    error = capsys.readouterr().err
    assert "1 of 2 runs failed" in error and "beta__uniform__candidate_ratio=20__seed0: candidate pool" in error
    assert (tmp_path / "abl" / "runs" / "beta__uniform__candidate_ratio=2__seed0" / "summary.json").exists()
    assert not (tmp_path / "abl" / "runs" / "beta__uniform__candidate_ratio=20__seed0").exists()


def test_ray_resources_declare_gpus_only_for_runs_on_a_gpu():
    from mpts.training.executors.ray import run_resources
    from mpts.training.sweep import expand_grid

    def only_run(env):
        return expand_grid(validate_config({**TINY, "env": env, "ablation": {"seeds": [0], "cpus_per_run": 2,
                                                                              "gpus_per_run": 0.5}}))[0]
    sim = only_run(TINY["env"])
    assert run_resources(sim, cluster_gpus=8) == {"num_cpus": 2, "num_gpus": 0.0}
    lm_auto, lm_cuda = only_run({"name": "lm"}), only_run({"name": "lm", "device": "cuda"})
    assert run_resources(lm_auto, cluster_gpus=8) == {"num_cpus": 2, "num_gpus": 0.5}
    assert run_resources(lm_auto, cluster_gpus=0) == {"num_cpus": 2, "num_gpus": 0.0}
    assert run_resources(lm_cuda, cluster_gpus=1)["num_gpus"] == 0.5
    with pytest.raises(ValueError, match="env.device is cuda but the Ray cluster has no GPU"):
        run_resources(lm_cuda, cluster_gpus=0)


def test_ray_executor_without_ray_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ValueError, match=r"pip install 'mpts\[ray\]'"):
        make_executor("ray", workers=1)


def test_a_corrupt_summary_is_refused_before_anything_runs(tmp_path):
    config = validate_config(tiny_grid(arms=[{"predictor": "beta", "acquisition": "uniform"}], seeds=[0, 1]))
    broken = tmp_path / "abl" / "runs" / "beta__uniform__seed1"
    broken.mkdir(parents=True)
    (broken / "summary.json").write_text('{"seed": 1, "predi')
    with pytest.raises(ValueError, match="summary.json is unreadable"):
        ablate(config, tmp_path / "abl", show_progress=False)
    assert sorted(p.name for p in (tmp_path / "abl" / "runs").iterdir()) == ["beta__uniform__seed1"]
    assert (broken / "summary.json").read_text() == '{"seed": 1, "predi'


def test_a_run_uses_as_many_threads_as_cpus_it_declared(tmp_path):
    import torch

    from mpts.training.executors.work import run_in_folder

    before = torch.get_num_threads()
    try:
        config = validate_config({**TINY, "steps": 1, "ablation": {"cpus_per_run": 2}})
        output = run_in_folder("r", config.model_dump(mode="json"), str(tmp_path / "r"))
        assert output.summary["seed"] == 0 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_killing_the_ablation_driver_takes_its_workers_with_it(tmp_path):
    """kill -9 of `mpts ablate` (local executor): its workers, and so the resource tracker they keep
    open, exit within seconds instead of running (or blocking) on as orphans."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil
    import yaml

    config = tmp_path / "long.yaml"
    config.write_text(yaml.safe_dump({**TINY, "steps": 100000, "checkpoint_every": 1000,
                                      "ablation": {"seeds": [0, 1], "workers": 2,
                                                   "arms": [{"predictor": "beta", "acquisition": "uniform"}]}}))
    out = tmp_path / "abl"
    driver = subprocess.Popen([sys.executable, "-m", "mpts.training.cli", "ablate", str(config), "--out", str(out)],
                              env={**os.environ, "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob("runs/*/config.yaml"))) < 2:  # both workers are inside a run
            assert driver.poll() is None and time.monotonic() < deadline, "the ablation did not start its runs"
            time.sleep(0.2)
        children = psutil.Process(driver.pid).children(recursive=True)
        assert len(children) >= 2
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        _, alive = psutil.wait_procs(children, timeout=10)
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, [(p.pid, p.cmdline()[-3:]) for p in alive]
    finally:
        driver.kill()
        for child in children:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass


def test_an_ablation_prints_a_line_per_finished_run_where_no_live_bar_shows(tmp_path, capsys):
    # under pytest stdout is not a terminal, as in a log file or a pipe (`make demo | tee`)
    config = validate_config(tiny_grid(arms=[{"predictor": "beta", "acquisition": "uniform"}],
                                       grid={"candidate_ratio": [2, 3]}, seeds=[0]))
    ablate(config, tmp_path / "abl", workers=1)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert [line.split()[:3] for line in lines] == [
        ["[1/2]", "beta__uniform__candidate_ratio=2__seed0", "done"],
        ["[2/2]", "beta__uniform__candidate_ratio=3__seed0", "done"]], lines
