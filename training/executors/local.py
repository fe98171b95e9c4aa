"""The local executor: one process per run on this machine, at most `workers` at once.

Workers die with their driver: each watches its parent and exits once the driver is gone, however
it ended (kill -9 included), rather than finishing runs nobody collects or waiting forever on a
queue nobody writes (a worker killed mid-run leaves a folder the next `mpts ablate` resumes).
"""

from __future__ import annotations

import concurrent.futures as futures
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from mpts.training.executors.work import RunOutput, run_in_folder
from mpts.training.sweep import GridRun


DRIVER_POLL_SECONDS = 0.5


def exit_with_driver(driver_pid: int) -> None:
    """Worker initializer: a daemon thread exits the worker as soon as its parent is no longer the
    driver (polling getppid works on every POSIX system and whichever thread started the worker)."""
    def watch() -> None:
        while os.getppid() == driver_pid:
            time.sleep(DRIVER_POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="mpts-driver-watch", daemon=True).start()


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
        with futures.ProcessPoolExecutor(max_workers=self.workers, mp_context=context,
                                         initializer=exit_with_driver, initargs=(os.getpid(),)) as pool:
            pending = {pool.submit(run_in_folder, run.name, run.config.model_dump(mode="json"),
                                   str(runs_dir / run.name)): run.name for run in runs}
            for done in futures.as_completed(pending):
                error = done.exception()
                yield pending[done], error if error is not None else done.result()
