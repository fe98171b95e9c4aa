"""The one place a `Selector` is built from names and options.

Every way in goes through here: the loop (`training/loop.py`), the TRL and verl adapters, replay
(`replay.py`, `replay_stream.py`) and `mpts bench`. So each checks a predictor or rule name and
its options the same way, and refuses a bad one with the same one line, naming the field as its
user wrote it (`Fields`)::

    plan = plan_selector(config.predictor, config.acquisition)      # checks; builds nothing
    selector = build_selector(plan, env.pool, k=config.k, seed=config.seed)

`plan_selector` only checks, so an adapter can refuse a setup before its trainer loads anything
and replay can size the predictor's state before building it; `build_selector` builds the
predictor, the rule and the Selector.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ValidationError
from torch import Tensor

from mpts.models.base import PromptPool, RiskPredictor
from mpts.models.registry import get_predictor_class
from mpts.training.acquisition import Acquisition, get_acquisition_class
from mpts.training.config import ComponentConfig, format_errors
from mpts.training.selector import Selector


class SelectorConfigError(ValueError):
    """A predictor or rule name or option that cannot be used; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Fields:
    """How the user spelled each part, for error messages (`{name}`: the component's name)."""

    predictor: str = "predictor.name"
    predictor_options: str = "predictor"
    rule: str = "acquisition.name"
    rule_options: str = "acquisition"

    def prefixed(self, prefix: str) -> "Fields":
        return Fields(*(prefix + getattr(self, f.name) for f in dataclasses.fields(self)))


@dataclasses.dataclass(frozen=True)
class SelectorPlan:
    """Checked classes and options; `rule` is None where nothing is selected (replay)."""

    predictor: type[RiskPredictor]
    predictor_options: BaseModel
    rule: type[Acquisition] | None = None
    rule_options: BaseModel | None = None


def plan_selector(predictor: str | ComponentConfig, rule: str | ComponentConfig | None = None, *,
                  predictor_options: Mapping[str, Any] | None = None, rule_options: Mapping[str, Any] | None = None,
                  fields: Fields = Fields(), trainer: str | None = None) -> SelectorPlan:
    """Look up and check a predictor (and rule) with their options; builds nothing.

    A `ComponentConfig` (a config's `{name: ..., **options}`) carries its own options. `trainer`
    names a trainer that rolls out exactly the B prompts it is given: a rule that needs the true
    success rates or rolls out every candidate is refused for it.
    """
    predictor_cls, checked_predictor = _component(predictor, predictor_options, get_predictor_class,
                                                  fields.predictor, fields.predictor_options)
    if rule is None:
        if rule_options is not None:
            raise SelectorConfigError(f"{fields.rule_options}: options given without a rule")
        return SelectorPlan(predictor_cls, checked_predictor)
    rule_cls, checked_rule = _component(rule, rule_options, get_acquisition_class, fields.rule, fields.rule_options)
    if trainer is not None and (rule_cls.needs_truth or rule_cls.rolls_out_all):
        why = "needs the true success rates" if rule_cls.needs_truth else "rolls out every candidate"
        raise SelectorConfigError(f"{fields.rule}: acquisition {rule_cls.name!r} cannot drive {trainer}: it {why}, "
                                  f"and {trainer} rolls out exactly the B prompts it is given; use a rule that picks "
                                  "B of C")
    return SelectorPlan(predictor_cls, checked_predictor, rule_cls, checked_rule)


def build_selector(plan: SelectorPlan, pool: PromptPool, *, seed: int, k: int | None = None,
                   ids: Sequence[Any] | np.ndarray | Tensor | None = None) -> Selector:
    """The predictor over `pool`, the rule, and the Selector around them (k: rollouts per prompt,
    None with no rule; ids: the prompts' labels, None: the rows themselves)."""
    model = plan.predictor(pool, plan.predictor_options, seed=seed)
    rule = None if plan.rule is None else plan.rule(plan.rule_options)
    return Selector(model, rule, k=k, seed=seed, ids=ids)


def _component(component: str | ComponentConfig, options: Mapping[str, Any] | None, lookup, name_field: str,
               options_field: str) -> tuple[type, BaseModel]:
    if isinstance(component, ComponentConfig):
        if options is not None:
            raise TypeError("a ComponentConfig carries its own options; pass none beside it")
        name, options = component.name, component.options
    else:
        name = component
    if not isinstance(name, str):
        raise SelectorConfigError(f"{name_field} must be a name (a string), got {type(name).__name__}")
    try:
        cls = lookup(name)
    except KeyError as error:
        raise SelectorConfigError(f"{name_field}: {error.args[0]}") from None
    where = options_field.format(name=name)
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise SelectorConfigError(f"{where} must be a mapping of option names to values, got {type(options).__name__}")
    try:
        return cls, cls.Options(**options)
    except ValidationError as error:
        raise SelectorConfigError(f"{where}: {format_errors(error, cls.Options)}") from None
    except TypeError as error:  # option names that are not strings
        raise SelectorConfigError(f"{where}: {error}") from None
