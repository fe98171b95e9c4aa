"""The Ray executor: each run is a Ray task with declared resources, on any node of a cluster.

No shared filesystem is assumed: a task gets the run folder's files as bytes (a stopped run's
files, to resume it), runs in a temporary folder on its node and returns the finished folder's
files; the driver writes them under `runs_dir`. A task whose worker process or node dies is
re-run by Ray (`ablation.max_retries`), that run only; an exception inside a run is not retried.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from mpts.training.executors import reaper
from mpts.training.executors.work import RunOutput, read_folder, run_detached, write_folder
from mpts.training.sweep import GridRun


def import_ray():
    try:
        import ray
    except ImportError:
        raise ValueError("--executor ray needs Ray: pip install 'mpts[ray]'") from None
    return ray


def run_resources(run: GridRun, cluster_gpus: float) -> dict[str, float]:
    """CPUs and GPUs one run declares; GPUs when its environment runs on one (`device: cuda`,
    or `auto` on a cluster that has GPUs)."""
    from mpts.training.environments.base import get_environment_class

    ablation = run.config.ablation
    options = run.config.env.with_options(get_environment_class(run.config.env.name).Options)
    device = getattr(options, "device", "cpu")
    if device == "cuda" and cluster_gpus == 0:
        raise ValueError(f"run {run.name}: env.device is cuda but the Ray cluster has no GPU")
    on_gpu = device == "cuda" or (device == "auto" and cluster_gpus > 0)
    return {"num_cpus": ablation.cpus_per_run, "num_gpus": ablation.gpus_per_run if on_gpu else 0.0}


class RayExecutor:
    def __init__(self, address: str | None = None, num_cpus: int | None = None):
        self.address = address
        self.num_cpus = num_cpus  # a local instance's CPUs (no address); a cluster declares its own

    def execute(self, runs: list[GridRun], runs_dir: Path) -> Iterator[tuple[str, RunOutput | BaseException]]:
        """Yields (run name, its output or the exception it raised) as runs finish, after writing
        a finished run's folder."""
        if not runs:
            return
        ray = import_ray()
        started_here = not ray.is_initialized()
        # a local instance's processes are this driver's: the reaper kills what outlives it (reaper.py)
        watcher = reaper.start() if started_here and self.address is None else None
        if started_here:
            try:
                ray.init(address=self.address, num_cpus=None if self.address else self.num_cpus,
                         include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError) as error:
                _stop(watcher)
                raise ValueError(f"cannot start or reach Ray at {self.address or 'a local instance'}: {error}") from None
        if watcher is not None:
            watcher.stdin.write(reaper.READY)
            watcher.stdin.flush()
        pending: dict = {}
        try:
            gpus = ray.cluster_resources().get("GPU", 0.0)
            resources = [run_resources(run, gpus) for run in runs]  # all checked before any is sent
            task = ray.remote(run_detached)
            for run, declared in zip(runs, resources):
                ref = task.options(**declared, max_retries=run.config.ablation.max_retries, retry_exceptions=False,
                                   name=f"mpts:{run.name}").remote(run.name, run.config.model_dump(mode="json"),
                                                                  read_folder(runs_dir / run.name))
                pending[ref] = run.name
            while pending:
                [ready], _ = ray.wait(list(pending), num_returns=1)
                name = pending.pop(ready)
                try:
                    output = ray.get(ready)
                except ray.exceptions.RayTaskError as error:  # the run raised: its own exception
                    yield name, error.cause if isinstance(error.cause, BaseException) else error
                    continue
                except ray.exceptions.RayError as error:  # retries ran out, or the cluster went away
                    yield name, error
                    continue
                write_folder(runs_dir / name, output.files)
                yield name, RunOutput(output.name, output.summary, {})  # the bytes are on disk now
        finally:
            for ref in pending:  # the driver stopped early: do not leave runs going
                ray.cancel(ref, force=True)
            if started_here:
                ray.shutdown()
            _stop(watcher)


def _stop(watcher) -> None:
    """Close the reaper's pipe (it kills what of Ray is left, normally nothing) and wait for it."""
    if watcher is not None:
        watcher.stdin.close()
        watcher.wait(timeout=30)
