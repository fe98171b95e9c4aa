"""Name -> class registries for every pluggable piece: predictors here; acquisition rules,
environments and tasks in `mpts.training` use the same `Registry`.

Built-ins are either named as "module:Class" and imported on first use (predictors,
environments, tasks: heavy dependencies load only when used) or registered when their module
is imported (the acquisition rules); users add their own with the registry's decorator (e.g. in
a notebook) without touching library code.
"""

from __future__ import annotations

import importlib
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """One kind of pluggable class (`kind` names it in error messages)."""

    def __init__(self, kind: str, builtin: dict[str, str] | None = None):
        self.kind = kind
        self._builtin = dict(builtin or {})
        self._registered: dict[str, type[T]] = {}

    def register(self, cls: type[T]) -> type[T]:
        """Class decorator: make `cls` selectable by `cls.name` in configs and the CLI."""
        if not getattr(cls, "name", None):
            raise ValueError(f"{cls.__name__} needs a class attribute `name` to be registered as a {self.kind}")
        self._registered[cls.name] = cls
        return cls

    def names(self) -> list[str]:
        return sorted(set(self._builtin) | set(self._registered))

    def __contains__(self, name: str) -> bool:
        return name in self._registered or name in self._builtin

    def get(self, name: str) -> type[T]:
        if name in self._registered:
            return self._registered[name]
        if name not in self._builtin:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        module_name, class_name = self._builtin[name].split(":")
        return getattr(importlib.import_module(module_name), class_name)


PREDICTORS: Registry = Registry("predictor", {
    "beta": "mpts.models.beta_bernoulli:BetaBernoulli",
    "hmm3": "mpts.models.hmm3:ThreeStateHMM",
    "hmm3_pooled": "mpts.models.hmm3:PooledThreeStateHMM",
    "id_vae": "mpts.models.id_vae:IdentifierVAE",
    "gp": "mpts.models.gp_embed:EmbeddingGP",
})
register_predictor = PREDICTORS.register
predictor_names = PREDICTORS.names
get_predictor_class = PREDICTORS.get
