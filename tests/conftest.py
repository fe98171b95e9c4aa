import os

# Two cores shared by the suite: torch threads inside each test only oversubscribe.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _embedding_cache(tmp_path_factory, monkeypatch):
    """Embedding caches of tests go to one folder per session, not to ~/.cache/mpts."""
    monkeypatch.setenv("MPTS_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "mpts-cache"))
