"""One strictness for every option model (predictors, rules, environments, tasks, run configs).

YAML and JSON hand over `true` where a number was meant and `.nan` / `.inf` where a finite value
was: pydantic's lax mode would take `true` as 1 and keep NaN. Every options model derives from
`StrictOptions`, so a number field refuses booleans (anywhere inside it, lists included) and
non-finite floats, and an unknown key is an error, whichever way the model is built (config
file, `--set`, Python).
"""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


def admits_bool(annotation: Any) -> bool:
    """Whether a field's type lets a bool through on purpose (bool, Any, a nested model)."""
    if annotation is bool or annotation is Any:
        return True
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return True  # a nested model applies its own rules
    if typing.get_origin(annotation) is typing.Literal:
        return any(isinstance(arg, bool) for arg in typing.get_args(annotation))
    return any(admits_bool(arg) for arg in typing.get_args(annotation))


def _mentions_number(annotation: Any) -> bool:
    return annotation in (int, float) or any(_mentions_number(arg) for arg in typing.get_args(annotation))


def _holds_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, (list, tuple)):
        return any(_holds_bool(item) for item in value)
    return False


class StrictOptions(BaseModel):
    """Unknown keys, booleans in number fields and NaN/inf are errors naming the field."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and _holds_bool(value) and not admits_bool(field.annotation):
            wanted = "a number" if _mentions_number(field.annotation) else "a value of its own type"
            raise ValueError(f"{info.field_name}: must be {wanted}, not a boolean (got {value!r})")
        return value
