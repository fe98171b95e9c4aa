"""The memory check before a run sees the features its predictor will get (gp on the LM's prompt texts)."""

from __future__ import annotations

from mpts.training.config import load_config
from mpts.training.embeddings import EMBEDDING_DIM
from mpts.training.environments.base import get_environment_class
from mpts.training.memory import pool_bytes, run_need


def _config(predictor: str):
    return load_config("lm_mixed", [f"predictor.name={predictor}"])


def test_lm_pool_features_are_its_text_embeddings_so_gp_passes_the_memory_check():
    lm = get_environment_class("lm")
    assert lm.feature_dim(lm.Options()) == EMBEDDING_DIM
    need = run_need(_config("gp"))  # raised "needs prompt embeddings ... this pool has none" before
    assert need.parts["env.num_prompts"] == pool_bytes(4000, EMBEDDING_DIM)
    simulator = get_environment_class("sim")
    assert simulator.feature_dim(simulator.Options(feature_dim=7)) == 7


def test_the_simulators_clusters_count_in_the_memory_check(tmp_path, capsys):
    """10^13 clusters were allocated (a traceback from torch's allocator) instead of refused."""
    from mpts.training.cli import main

    need = run_need(load_config("demo", ["env.num_clusters=1000"]))
    assert need.parts["env.num_clusters"] == 4 * 1001 * (16 + 4)
    out = tmp_path / "run"
    code = main(["run", "demo", "--set", "env.num_clusters=10000000000000", "--out", str(out)])
    assert code == 2 and not out.exists()
    assert "env.num_clusters" in capsys.readouterr().err
