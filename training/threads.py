"""Intra-op threads for the predictor's hot paths (predict, select, observe).

These calls work on a few thousand candidates at a time: too little to gain from more than one
thread, and on a busy machine (rollout workers, data loaders, other runs) every extra thread has
to wait for a core, and torch's parallel regions wait for their slowest thread. Measured with
`mpts bench --background-load N` (README, Benchmarks): one thread keeps a step's time close to the
quiet figure under load where torch's default (one thread per core) does not. The run config's
`predictor_threads` (default 1) sets it; None leaves torch's setting alone. The environment's own
phases (rollouts, a policy update) keep the process's setting.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

DEFAULT_PREDICTOR_THREADS = 1


@contextmanager
def intra_op_threads(threads: int | None) -> Iterator[None]:
    """Run the block with `threads` intra-op threads, then restore the previous number."""
    before = torch.get_num_threads()
    if threads is None or threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
