"""Kills the processes a driver started for a local Ray instance once the driver is gone.

`ray.init()` without an address starts Ray's processes as the driver's children. When the driver
dies by kill -9, Ray's own fate sharing takes down the GCS, the raylet and (within ~3 s) the task
workers, but the raylet's DashboardAgent and RuntimeEnvAgent notice the raylet's death and then
wait up to 60 s trying to report it to the GCS that is already gone (Ray 2.60,
`ray/_private/process_watcher.py`, a timeout Ray does not expose) -- measured: 61.7 s after the
kill. No `ray.init` option avoids starting them: the raylet needs the runtime env agent to start
workers.

So the Ray executor starts this file as a separate process (`start`) before `ray.init`, with a
pipe from the driver on its stdin. It adopts the driver's children born after it started (Ray's
processes) until told `ray is up`, and follows their descendants. When the pipe closes -- the
driver finished (after `ray.shutdown()`, nothing is left) or died, however -- it kills every
adopted process still running and exits. It runs in its own session so a signal to the driver's
process group does not stop it first. Only stdlib and psutil: it must start fast and import no
mpts code.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import psutil

POLL_SECONDS = 0.2
READY = b"ray is up\n"


def start() -> subprocess.Popen:
    """The reaper for this process's children from now on; write READY to its stdin once Ray's
    processes are started, close it (or exit) when done."""
    driver = psutil.Process()
    own_children = [str(child.pid) for child in driver.children()]  # not Ray's: never adopted
    return subprocess.Popen([sys.executable, str(Path(__file__)), str(driver.pid), *own_children],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True)


def _watch(driver: psutil.Process, before: set[int], done: threading.Event, ready: threading.Event) -> None:
    adopted: dict[int, psutil.Process] = {}
    me = psutil.Process().pid

    def adopt() -> None:
        roots = [] if ready.is_set() else [c for c in _children(driver) if c.pid not in before and c.pid != me]
        for process in roots + [d for p in list(adopted.values()) for d in _children(p, recursive=True)]:
            adopted.setdefault(process.pid, process)

    while not done.wait(POLL_SECONDS):
        adopt()
    adopt()  # what started since the last look
    for process in adopted.values():
        try:
            process.kill()  # psutil checks the pid still names the process it adopted (not a reused pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def _children(process: psutil.Process, recursive: bool = False) -> list[psutil.Process]:
    try:
        return process.children(recursive=recursive)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def main(driver_pid: int, before: set[int]) -> None:
    done, ready = threading.Event(), threading.Event()

    def read_pipe() -> None:
        for line in sys.stdin.buffer:
            if line == READY:
                ready.set()
        done.set()  # end of file: the driver closed the pipe or died

    threading.Thread(target=read_pipe, daemon=True).start()
    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        return
    _watch(driver, before, done, ready)


if __name__ == "__main__":
    main(int(sys.argv[1]), {int(pid) for pid in sys.argv[2:]})
