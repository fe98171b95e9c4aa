"""The local executor: one process per run on this machine, at most `workers` at once."""

from __future__ import annotations

import concurrent.futures as futures
import multiprocessing
from collections.abc import Iterator
from pathlib import Path

from mpts.training.executors.work import RunOutput, run_in_folder
from mpts.training.sweep import GridRun


class LocalExecutor:
    def __init__(self, workers: int):
        self.workers = workers

    def execute(self, runs: list[GridRun], runs_dir: Path) -> Iterator[tuple[str, RunOutput | BaseException]]:
        """Yields (run name, its output or the exception it raised) as runs finish; each run
        writes (or resumes) its own folder under `runs_dir`."""
        if not runs:
            return
        # spawn, not fork: torch and Pyro hold threads and global state a fork would copy half-way
        context = multiprocessing.get_context("spawn")
        with futures.ProcessPoolExecutor(max_workers=self.workers, mp_context=context) as pool:
            pending = {pool.submit(run_in_folder, run.name, run.config.model_dump(mode="json"),
                                   str(runs_dir / run.name)): run.name for run in runs}
            for done in futures.as_completed(pending):
                error = done.exception()
                yield pending[done], error if error is not None else done.result()
