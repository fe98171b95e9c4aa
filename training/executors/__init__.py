"""Executors: where the runs of a grid execute. The only code that knows about processes or Ray.

An executor has one method, `execute(runs, runs_dir)`, yielding `(run name, RunOutput or the
exception the run raised)` as runs finish, with each finished run's folder written under
`runs_dir`. `local` (a process pool on this machine) and `ray` (tasks on a Ray cluster).
"""

from __future__ import annotations

EXECUTORS = ("local", "ray")


def make_executor(name: str, *, workers: int, address: str | None = None):
    if name == "local":
        if address is not None:
            raise ValueError("--address is for --executor ray")
        from mpts.training.executors.local import LocalExecutor
        return LocalExecutor(workers)
    if name == "ray":
        from mpts.training.executors.ray import RayExecutor, import_ray
        import_ray()  # fail before any run starts when Ray is missing
        return RayExecutor(address, num_cpus=workers)
    raise ValueError(f"unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}")
