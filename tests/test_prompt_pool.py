"""PromptPool: texts, features and clusters, given as tensors or as lazy callables; extras errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mpts.models.base import PromptPool
from mpts.models.extras import MissingExtraError, import_extra
from mpts.models.registry import get_predictor_class
from mpts.training.embeddings import text_pool


def test_callables_are_called_once_on_first_access_and_checked():
    calls = []

    def features():
        calls.append("features")
        return torch.ones(4, 2)

    pool = PromptPool(4, features=features, clusters=lambda: torch.tensor([0, 0, 1, 1]))
    assert pool.has_features and pool.has_clusters and calls == []
    assert pool.features.shape == (4, 2) and pool.features is pool.features
    assert calls == ["features"]
    assert pool.clusters.tolist() == [0, 0, 1, 1]

    bad = PromptPool(4, features=lambda: torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"pool.features has shape \(3, 2\) but the pool has 4 prompts"):
        bad.features


def test_plain_values_are_checked_at_construction():
    with pytest.raises(ValueError, match="empty"):
        PromptPool(0)
    with pytest.raises(ValueError, match="pool.clusters has shape"):
        PromptPool(3, clusters=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="pool.texts has 1 entries"):
        PromptPool(2, texts=["a"])
    with pytest.raises(TypeError, match="strings"):
        PromptPool(2, texts=["a", 3])
    pool = PromptPool(2)
    assert pool.features is None and pool.clusters is None and not pool.has_features


def test_a_predictor_reads_a_lazy_cluster_source():
    hmm = get_predictor_class("hmm3_pooled")
    pool = PromptPool(6, clusters=lambda: torch.tensor([5, 5, 9, 9, 9, 5]))
    predictor = hmm(pool)
    assert predictor.state.pool_excess.shape[0] == 2


def test_text_pool_embeds_only_when_asked(monkeypatch):
    import mpts.training.embeddings as embeddings

    asked = []
    monkeypatch.setattr(embeddings, "pool_embeddings", lambda texts, cache_dir=None: asked.append(texts) or torch.zeros(len(texts), 3))
    pool = text_pool(["a", "b"], clusters=torch.tensor([0, 1]))
    assert asked == [] and pool.texts == ("a", "b")
    assert pool.features.shape == (2, 3) and asked == [("a", "b")]


def test_pool_embeddings_are_cached_by_the_hash_of_the_texts(tmp_path):
    from mpts.training.embeddings import pool_embeddings, texts_digest

    texts = ["What is 1 + 1?", "Name a colour."]
    first = pool_embeddings(texts, tmp_path)
    assert (tmp_path / f"{texts_digest(texts)}.safetensors").exists()
    torch.testing.assert_close(pool_embeddings(texts, tmp_path), first)
    pool_embeddings(texts[::-1], tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_a_missing_extra_names_the_extra_in_one_line():
    with pytest.raises(MissingExtraError, match=r"needs the package 'no_such_package_xyz'.*pip install 'mpts\[gp\]'"):
        import_extra("no_such_package_xyz", "gp")
    with pytest.raises(KeyError, match="unknown extra"):
        import_extra("torch", "nope")


def test_the_cli_reports_a_missing_extra_in_one_line(tmp_path):
    # A child process where matplotlib cannot be imported: `mpts report` must say which extra to install.
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from mpts.training.cli import main\n"
            f"sys.exit(main(['report', {str(tmp_path)!r}, '--out', {str(tmp_path / 'r')!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'mpts[reports]'" in lines[0]


def test_gp_runs_on_the_lm_environment_with_embedded_prompts(tmp_path):
    from mpts.training.embeddings import embed_texts
    from mpts.training.environments.lm.env import LMEnvironment, LMOptions

    tiny = {"hidden_size": 64, "num_layers": 1, "num_heads": 1, "num_kv_heads": 1, "intermediate_size": 128}
    env = LMEnvironment(LMOptions(num_prompts=12, eval_prompts=4, max_new_tokens=2, tiny=tiny,
                                  task_options={"max_digits": 2}), seed=0, run_dir=tmp_path / "run")
    try:
        assert env.pool.has_features and env.pool.has_clusters
        torch.testing.assert_close(env.pool.features, embed_texts(list(env.pool.texts)))
        gp = get_predictor_class("gp")
        predictor = gp(env.pool, gp.Options(num_inducing=4, svi_steps=5, pca_dim=4), seed=0)
        ids = torch.arange(6)
        outcomes = env.rollout(ids, 2)
        predictor.observe(outcomes.ids, outcomes.successes, outcomes.trials, 0)
        assert torch.isfinite(predictor.predict(torch.arange(12), 1).mean).all()
    finally:
        env.close()


def test_feature_dim_is_known_without_computing_lazy_features():
    called = []
    pool = PromptPool(3, features=lambda: called.append(1) or torch.zeros(3, 5), feature_dim=5)
    assert pool.feature_dim == 5 and called == []
    assert PromptPool(3, features=torch.zeros(3, 2)).feature_dim == 2 and PromptPool(3).feature_dim == 0
    assert text_pool(["a", "b"]).feature_dim == 384
