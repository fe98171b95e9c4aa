"""The reaper (the Ray executor's, training/executors/reaper.py) without Ray: when its driver dies it
kills the processes the driver started after the reaper (and their descendants), and only those."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil

DRIVER = textwrap.dedent("""
    import subprocess, sys, time
    from mpts.training.executors import reaper
    own = subprocess.Popen(["sleep", "300"])               # the driver's own child, born before the reaper
    watcher = reaper.start()
    started = subprocess.Popen(["sh", "-c", "sleep 300 & sleep 300"])  # "Ray": a child with a child
    time.sleep(1.0)                                         # the reaper adopts it (polls every 0.2 s)
    watcher.stdin.write(reaper.READY); watcher.stdin.flush()
    print(own.pid, started.pid, watcher.pid, flush=True)
    if sys.argv[1] == "finish":
        started.kill(); started.wait()
        watcher.stdin.close(); watcher.wait(timeout=30)
        own.kill()
        print("done", flush=True)
    else:
        time.sleep(300)
""")


def start_driver(mode: str) -> tuple[subprocess.Popen, list[int]]:
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, mode], stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in driver.stdout.readline().split()]
    return driver, pids


def gone(process: psutil.Process) -> bool:
    return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE


def test_the_reaper_kills_what_the_driver_started_after_it_when_the_driver_is_killed():
    driver, (own, started, watcher) = start_driver("kill")
    own_child = psutil.Process(own)
    ray_like = [psutil.Process(started), *psutil.Process(started).children(recursive=True)]
    reaper = psutil.Process(watcher)
    try:
        assert len(ray_like) >= 2  # the shell and its sleeps
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        deadline = time.monotonic() + 5
        while not all(gone(p) for p in [*ray_like, reaper]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(gone(p) for p in [*ray_like, reaper]), [p.pid for p in ray_like if not gone(p)]
        assert not gone(own_child)  # born before the reaper: not Ray's, left alone
    finally:
        for process in [own_child, *ray_like, reaper]:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass


def test_a_driver_that_finishes_stops_its_reaper():
    driver, (own, started, watcher) = start_driver("finish")
    assert driver.stdout.readline().strip() == "done"
    assert driver.wait(timeout=30) == 0
    assert not psutil.pid_exists(watcher) or gone(psutil.Process(watcher))
