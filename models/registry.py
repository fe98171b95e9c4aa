"""Name -> predictor class. Built-ins are imported lazily; users add their own with
`@register_predictor` (e.g. in a notebook) without touching library code."""

from __future__ import annotations

import importlib

from .base import RiskPredictor

_BUILTIN = {
    "beta": "mpts.models.beta_bernoulli:BetaBernoulli",
    "hmm3": "mpts.models.hmm3:ThreeStateHMM",
    "hmm3_pooled": "mpts.models.hmm3:PooledThreeStateHMM",
    "id_vae": "mpts.models.id_vae:IdentifierVAE",
    "gp": "mpts.models.gp_embed:EmbeddingGP",
}
_REGISTERED: dict[str, type[RiskPredictor]] = {}


def register_predictor(cls: type[RiskPredictor]) -> type[RiskPredictor]:
    """Class decorator: make `cls` selectable by `cls.name` in configs and the CLI."""
    if not getattr(cls, "name", None):
        raise ValueError(f"{cls.__name__} needs a class attribute `name` to be registered")
    _REGISTERED[cls.name] = cls
    return cls


def predictor_names() -> list[str]:
    return sorted(set(_BUILTIN) | set(_REGISTERED))


def get_predictor_class(name: str) -> type[RiskPredictor]:
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in _BUILTIN:
        raise KeyError(f"unknown predictor {name!r}; known: {', '.join(predictor_names())}")
    module_name, class_name = _BUILTIN[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)
