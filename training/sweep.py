"""Sweep expansion: an ablation config -> one (folder name, config, grid point) per run.

The runs are arms x grid points x seeds. `ablation.grid` maps dotted config keys to values
(`predictor.decay: [0.5, 0.9]`, `candidate_ratio: [4, 8]`); a key of a component's options
(`predictor.decay`) applies to the arms whose component has that option and is left out of the
others' points (uniform sampling has no `target`), so no run is repeated for a value it ignores.
Each run's config records its point under `ablation.point`, and its folder name spells it out.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from typing import Any

from mpts.inference.schema import format_grid_value
from mpts.training.config import COMPONENT_SECTIONS, ConfigError, RunConfig, set_dotted, validate_config

@dataclasses.dataclass(frozen=True)
class GridRun:
    name: str
    config: RunConfig
    point: dict[str, Any]


def _component(value: str | dict[str, Any]) -> dict[str, Any]:
    return {"name": value} if isinstance(value, str) else dict(value)


def point_slug(point: dict[str, Any]) -> str:
    """`key=value__key=value`, file-name safe."""
    return "__".join(re.sub(r"[^A-Za-z0-9._=+-]+", "-", f"{key}={format_grid_value(value)}") for key, value in point.items())


def _component_class(section: str, name: str):
    from mpts.models.registry import get_predictor_class
    from mpts.training.acquisition import get_acquisition_class
    from mpts.training.environments.base import get_environment_class

    lookup = {"env": get_environment_class, "predictor": get_predictor_class, "acquisition": get_acquisition_class}
    return lookup[section](name)


def _applies(key: str, raw: dict[str, Any]) -> bool:
    """Whether a grid key means something for this arm's config."""
    parts = key.split(".")
    if parts[0] not in COMPONENT_SECTIONS or len(parts) != 2 or parts[1] == "name":
        return True
    try:
        cls = _component_class(parts[0], raw[parts[0]]["name"])
    except KeyError:
        return True  # an unknown component: validation names it
    return parts[1] in cls.Options.model_fields


def expand_grid(config: RunConfig) -> list[GridRun]:
    """Every arm x grid point x seed, validated; names are unique."""
    base = config.model_dump(mode="json")
    grid = config.ablation.grid
    used: set[str] = set()
    runs = []
    for arm in config.ablation.arms or [None]:
        raw = dict(base)
        if arm is not None:
            raw["predictor"] = _component(arm.predictor)
            raw["acquisition"] = _component(arm.acquisition)
        keys = [key for key in grid if _applies(key, raw)]
        used.update(keys)
        for values in itertools.product(*(grid[key] for key in keys)):
            point = dict(zip(keys, values))
            arm_raw = json.loads(json.dumps(raw))  # a deep copy of plain data
            for key, value in point.items():
                set_dotted(arm_raw, key.split("."), value, what=f"ablation.grid: {key}")
            arm_raw["ablation"] = {**arm_raw["ablation"], "point": point}
            prefix = f"{arm_raw['predictor']['name']}__{arm_raw['acquisition']['name']}"
            for seed in config.ablation.seeds:
                name = "__".join(filter(None, [prefix, point_slug(point), f"seed{seed}"]))
                try:
                    cfg = validate_config({**arm_raw, "seed": seed})
                except ConfigError as error:
                    raise ConfigError(f"run {name}: {error}") from None
                runs.append(GridRun(name, cfg, point))
    unused = [key for key in grid if key not in used]
    if unused:
        raise ConfigError(f"ablation.grid: {', '.join(unused)} is an option of none of the arms' components")
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"ablation runs repeat a name ({repeated[0]}): arms must differ in (predictor, acquisition) "
                          f"and grid values must differ in their file-name form")
    return runs
