"""The Ray executor on a local Ray instance and on a simulated two-node cluster: same results as
local processes, no shared filesystem needed, a killed worker or a lost node re-runs that run only."""

import os
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from grid_helpers import TINY, assert_same_results, tiny_grid

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'mpts[ray]')")

from mpts.training.ablate import ablate  # noqa: E402
from mpts.training.config import validate_config  # noqa: E402
from mpts.training.executors.work import read_folder  # noqa: E402
from mpts.training.loop import run  # noqa: E402
from mpts.training.sweep import expand_grid  # noqa: E402

ARMS = [{"predictor": "beta", "acquisition": "uniform"}, {"predictor": "hmm3", "acquisition": "top_informative"}]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def run_processes(parent: int | None = None) -> list[int]:
    """Pids of Ray workers executing an mpts run (the task name is the process title), optionally
    only the children of one raylet."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes()
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if title.startswith(b"ray::mpts:") and (parent is None or ppid == parent):
            pids.append(int(entry.name))
    return pids


def when_running(action, parent: int | None = None) -> threading.Thread:
    """Call action(pid) once, as soon as some run executes (under `parent`)."""
    def watch():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            pids = run_processes(parent)
            if pids:
                action(pids[0])
                return
            time.sleep(0.02)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def assert_every_run_once_and_complete(out: Path, config) -> None:
    """Every run of the grid exactly once, whole, and equal to the same run made in this process."""
    runs = expand_grid(config)
    table = pd.read_parquet(out / "runs.parquet")
    assert sorted(table["run"]) == sorted(r.name for r in runs)
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(r.name for r in runs)
    for grid_run in runs:
        folder = out / "runs" / grid_run.name
        metrics = pd.read_parquet(folder / "metrics.parquet")
        assert list(metrics["step"]) == list(range(config.steps))
        reference = out.parent / "reference" / grid_run.name
        run(grid_run.config, reference)
        assert_same_results(reference, folder)


def test_ray_matches_local_processes_and_resumes_without_shared_files(tmp_path, local_ray):
    config = validate_config(tiny_grid(arms=ARMS, grid={"candidate_ratio": [2, 3]}, seeds=[0]))
    ablate(config, tmp_path / "local", show_progress=False)
    # a stopped run in the Ray ablation's folder: its files travel to the worker and back
    stopped = next(r for r in expand_grid(config) if r.name == "hmm3__top_informative__candidate_ratio=3__seed0")

    class Stop(Exception):
        pass

    def stop_at_3(done, total, metrics):
        if done == 3:
            raise Stop
    with pytest.raises(Stop):
        run(stopped.config, tmp_path / "ray" / "runs" / stopped.name, progress=stop_at_3)
    table = ablate(config, tmp_path / "ray", executor="ray", show_progress=False)
    assert len(table) == 4
    for grid_run in expand_grid(config):
        assert_same_results(tmp_path / "local" / "runs" / grid_run.name, tmp_path / "ray" / "runs" / grid_run.name)
    assert set(read_folder(tmp_path / "ray" / "runs" / stopped.name)) == set(
        read_folder(tmp_path / "local" / "runs" / stopped.name))
    local_runs = pd.read_parquet(tmp_path / "local" / "runs.parquet")
    ray_runs = pd.read_parquet(tmp_path / "ray" / "runs.parquet")
    same = [c for c in local_runs if "seconds" not in c and "wall" not in c]
    pd.testing.assert_frame_equal(local_runs[same], ray_runs[same])


def test_a_killed_worker_reruns_that_run_only(tmp_path, local_ray):
    config = validate_config(tiny_grid(arms=ARMS[:1], grid={"candidate_ratio": [2, 3]}, seeds=[0, 1]))
    killed = []
    watcher = when_running(lambda pid: (os.kill(pid, signal.SIGKILL), killed.append(pid)))
    ablate(config, tmp_path / "abl", executor="ray", show_progress=False)
    watcher.join(timeout=1)
    assert len(killed) == 1  # a run was executing when its worker died
    assert_every_run_once_and_complete(tmp_path / "abl", config)


def test_a_run_that_raises_is_reported_not_retried(tmp_path, local_ray):
    from mpts.training.ablate import RunsFailed

    config = validate_config(tiny_grid(arms=ARMS[:1], grid={"candidate_ratio": [2, 20]}, seeds=[0]))
    with pytest.raises(RunsFailed, match="beta__uniform__candidate_ratio=20__seed0: .*candidate pool"):
        ablate(config, tmp_path / "abl", executor="ray", show_progress=False)
    assert (tmp_path / "abl" / "runs" / "beta__uniform__candidate_ratio=2__seed0" / "summary.json").exists()
    assert not (tmp_path / "abl" / "runs" / "beta__uniform__candidate_ratio=20__seed0").exists()


def test_cli_executor_ray(tmp_path, local_ray, capsys):
    import yaml

    from mpts.training.cli import main

    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(tiny_grid(arms=ARMS[:1], grid={"predictor.decay": [0.5, 0.9]}, seeds=[3])))
    assert main(["ablate", str(config), "--out", str(tmp_path / "abl"), "--executor", "ray"]) == 0
    assert "| beta | uniform | 0.9 |" in capsys.readouterr().out
    assert (tmp_path / "abl" / "runs" / "beta__uniform__predictor.decay=0.9__seed3" / "summary.json").exists()


GONE_WITHIN_SECONDS = 10  # measured: 0.2 s with the reaper; without it Ray's agents lived 61.7 s


def test_killing_the_driver_of_a_local_ray_ablation_takes_every_process_it_started(tmp_path):
    """kill -9 of `mpts ablate --executor ray` (a local Ray instance): every process it started --
    Ray's GCS, raylet, agents and the task workers running mpts runs -- is gone within seconds."""
    import subprocess
    import sys

    import psutil
    import yaml

    from grid_helpers import TINY

    config = tmp_path / "long.yaml"
    config.write_text(yaml.safe_dump({**TINY, "steps": 100000, "checkpoint_every": 1000,
                                      "ablation": {"seeds": [0, 1], "workers": 2,
                                                   "arms": [{"predictor": "beta", "acquisition": "uniform"}]}}))
    driver = subprocess.Popen([sys.executable, "-m", "mpts.training.cli", "ablate", str(config), "--out",
                               str(tmp_path / "abl"), "--executor", "ray"],
                              env={**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": "local"},  # its own instance
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 180
        while True:
            started = psutil.Process(driver.pid).children(recursive=True)
            titles = [title(p) for p in started]
            if sum(t.startswith("ray::mpts:") for t in titles) == 2 and any("Agent" in t for t in titles):
                break  # both runs execute and Ray's agents are up
            assert driver.poll() is None and time.monotonic() < deadline, "the Ray ablation did not start its runs"
            time.sleep(0.2)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        _, alive = psutil.wait_procs(started, timeout=GONE_WITHIN_SECONDS)
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, [(p.pid, p.cmdline()[:1]) for p in alive]
    finally:
        driver.kill()
        for process in started:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass


def title(process) -> str:
    import psutil

    try:
        return " ".join(process.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return ""
