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
    assert predictor.pool_excess.shape[0] == 2


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
