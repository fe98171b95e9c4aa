"""Run configuration: one validated pydantic object per run.

A config is a YAML file: a named one shipped in `mpts/training/configs/` (e.g. `quickstart`) or a
user's own path. `--set key.sub=value` overrides apply before validation. Every section is strict:
an unknown key or a bad value is an error naming the field. The `predictor`, `acquisition` and
`env` sections are flat (`{name: beta, decay: 0.8}`); their options are validated against the
named component's own `Options` model.

Every number is checked here, at the edge, by one set of rules (`StrictOptions`): a boolean is
not a number, NaN and inf are refused, each option has a documented range, and a run whose sizes
would not fit in memory is refused up front (`mpts.training.memory`). Errors are one line naming
the option.
"""

from __future__ import annotations

import argparse
import copy
import importlib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, ClassVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from mpts.models.options import StrictOptions
from mpts.training.threads import DEFAULT_PREDICTOR_THREADS

CONFIG_PACKAGE = "mpts.training.configs"
COMPONENT_SECTIONS = ("env", "predictor", "acquisition")

Seed = Annotated[int, Field(ge=0, le=2**32 - 1, description="RNG seed, 0 .. 2^32-1")]


class ConfigError(ValueError):
    """A config that does not validate; the message names each bad field."""


class ComponentConfig(BaseModel):
    """`{name: ..., **options}`: options checked against the named component's Options."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def with_options(self, options_model) -> Any:
        return options_model(**self.options)


def _check_component(section: str, component: ComponentConfig, lookup) -> None:
    try:
        cls = lookup(component.name)
    except KeyError as error:
        raise ValueError(f"{section}.name: {error.args[0]}") from None
    try:
        cls.Options(**component.options)
    except ValidationError as error:
        raise ValueError(f"{section}: " + format_errors(error, cls.Options)) from None


class AblationArm(StrictOptions):
    predictor: str | dict[str, Any]
    acquisition: str | dict[str, Any]


GRID_FORBIDDEN = ("name", "seed", "plugins", "ablation")  # seeds have their own list; the rest name the grid itself


class AblationConfig(StrictOptions):
    arms: list[AblationArm] = Field(default_factory=list, description="(predictor, acquisition) pairs; empty = the run's own")
    seeds: list[Seed] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    workers: int = Field(2, ge=1, le=1024, description="parallel runs on this machine (local processes, local Ray CPUs)")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="dotted config key -> values, crossed "
                                       "with arms and seeds (e.g. predictor.decay: [0.5, 0.9])")
    point: dict[str, Any] = Field(default_factory=dict, description="this run's point in the grid (written by the "
                                  "ablation into each run's config)")
    cpus_per_run: float = Field(1.0, gt=0.0, description="CPUs a run declares to Ray")
    gpus_per_run: float = Field(1.0, ge=0.0, description="GPUs a run declares to Ray when its environment runs "
                                "on a GPU (env.device cuda, or auto on a cluster with GPUs)")
    max_retries: int = Field(3, ge=0, description="times Ray re-runs a run whose worker or node was lost")

    @field_validator("grid")
    @classmethod
    def _grid_keys_and_values(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            parts = key.split(".")
            if not all(parts):
                raise ValueError(f"ablation.grid: key {key!r} has an empty part")
            if parts[0] in GRID_FORBIDDEN:
                raise ValueError(f"ablation.grid: {key} cannot be swept (seeds go in ablation.seeds, "
                                 f"predictor/rule pairs in ablation.arms)")
            if parts[0] not in RunConfig.model_fields:
                raise ValueError(f"ablation.grid: {key}: {parts[0]!r} is not a config key")
            if not values:
                raise ValueError(f"ablation.grid: {key} has no values")
            if len({repr(v) for v in values}) != len(values):
                raise ValueError(f"ablation.grid: {key} repeats a value ({values})")
        return grid


def import_plugins(modules: list[str]) -> None:
    """Import each module (it may register predictors); importing runs its code, so plugins are
    trusted like the config that names them."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ValueError(f"plugins: cannot import {module!r} ({error})") from None


class RunConfig(StrictOptions):
    name: str = "run"
    plugins: list[str] = Field(default_factory=list, description="modules imported first (they may register "
                               "predictors); lets spawned ablation workers see user-defined predictors")
    seed: Seed = 0
    steps: int = Field(200, ge=1, le=10**9)
    batch_size: int = Field(64, ge=1, le=10**7, description="B: prompts rolled out (and trained on) per step")
    candidate_ratio: int = Field(8, ge=1, le=10**4, description="candidates per step = candidate_ratio * batch_size")
    k: int = Field(8, ge=1, le=2**16, description="rollouts per prompt")
    exclusion_window: int = Field(0, ge=0, le=10**9, description="W: prompts trained in the last W steps are not "
                                  "candidates (any rule); 0: no exclusion")
    target_accuracy: float = Field(0.6, gt=0.0, le=1.0, description="eval accuracy that counts as reached")
    eval_every: int = Field(1, ge=1, le=10**9)
    checkpoint_every: int = Field(50, ge=1, le=10**9)
    posterior_draws_prompts: int = Field(64, ge=0, le=10**6, description="prompts whose final posterior draws are saved")
    predictor_threads: int | None = Field(DEFAULT_PREDICTOR_THREADS, ge=1, le=1024,
                                          description="torch intra-op threads for predict/select/observe "
                                                      "(None: torch's setting); see mpts.training.threads")
    env: ComponentConfig = ComponentConfig(name="sim")
    predictor: ComponentConfig = ComponentConfig(name="beta")
    acquisition: ComponentConfig = ComponentConfig(name="thompson_target")
    ablation: AblationConfig = AblationConfig()

    @field_validator(*COMPONENT_SECTIONS, mode="before")
    @classmethod
    def _name_alone(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value  # `predictor: beta` = `{name: beta}`

    @model_validator(mode="before")
    @classmethod
    def _import_plugins(cls, raw: Any) -> Any:
        plugins = raw.get("plugins") if isinstance(raw, dict) else None
        if not isinstance(plugins, list) or not all(isinstance(m, str) for m in plugins):
            return raw  # not a list of module names: the field's own check says so
        import_plugins(plugins)
        return raw

    @model_validator(mode="after")
    def _components_exist(self) -> "RunConfig":
        from mpts.training.environments.base import get_environment_class
        from mpts.training.selector_factory import plan_selector

        _check_component("env", self.env, get_environment_class)
        rule, env = plan_selector(self.predictor, self.acquisition).rule, get_environment_class(self.env.name)
        if rule.needs_truth and not env.provides_truth:
            raise ValueError(f"acquisition {rule.name!r} ranks on the true success probabilities, which "
                             f"environment {env.name!r} does not know; use it with the simulator ('sim')")
        return self

    @property
    def num_candidates(self) -> int:
        return self.candidate_ratio * self.batch_size


def format_errors(error: ValidationError, model: type[BaseModel] | None = None) -> str:
    """A ValidationError as one line; with `model`, an unknown top-level key lists the known ones."""
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            known = f" (known: {', '.join(model.model_fields)})" if model is not None and len(item["loc"]) == 1 else ""
            parts.append(f"{where}: unknown key{known}")
        elif item["type"] == "value_error":
            parts.append(item["msg"].removeprefix("Value error, "))
        else:
            parts.append(f"{where}: {item['msg']} (got {item.get('input')!r})")
    return "; ".join(parts)


class OneLineErrors(BaseModel):
    """Base of the option models a user builds in Python (the TRL and verl adapters'): a refused
    value raises a ValueError of one line naming each bad field, as the CLI prints, instead of
    pydantic's several-line ValidationError. `error_prefix` names the model as the user wrote it."""

    error_prefix: ClassVar[str] = ""

    def __init__(self, **values: Any):
        try:
            super().__init__(**values)
        except ValidationError as error:
            raise ValueError(f"{self.error_prefix or type(self).__name__}: {format_errors(error, type(self))}") from None


def build_options(model: type[BaseModel], values: Any, where: str) -> Any:
    """`model(**values)` for options a user handed to the Python API, or a ValueError of one line
    naming `where`, each bad field and the known keys (pydantic's own message is several lines
    and a URL)."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a mapping of option names to values, got {type(values).__name__}")
    try:
        return model(**values)
    except ValidationError as error:
        raise ValueError(f"{where}: {format_errors(error, model)}") from None


def cli_number(kind: type, **bounds: Any):
    """An argparse `type` for a numeric flag, checked by the same rules as the config (no
    booleans, finite, within `bounds` such as ge=1, le=...)."""
    adapter = TypeAdapter(Annotated[kind, Field(**bounds)], config=ConfigDict(allow_inf_nan=False))

    def parse(text: str):
        try:
            return adapter.validate_python(text.strip())
        except ValidationError as error:
            raise argparse.ArgumentTypeError(
                f"{error.errors()[0]['msg'].removeprefix('Value error, ')} (got {text!r})") from None

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def named_configs() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(CONFIG_PACKAGE).iterdir() if p.name.endswith(".yaml"))


def read_config_source(name_or_path: str | Path) -> dict[str, Any]:
    """The raw mapping of a named config or a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        data = path.read_bytes()
    else:
        resource = resources.files(CONFIG_PACKAGE) / f"{name_or_path}.yaml"
        if not resource.is_file():
            raise ConfigError(f"no config named {name_or_path!r}; named configs: {', '.join(named_configs())}")
        data = resource.read_bytes()
    return parse_config_text(data, f"config {name_or_path}", empty_ok=True)


MAX_YAML_DEPTH = 64  # far deeper than any config; deeper (or cyclic) values are refused, not recursed into


def parse_config_text(data: bytes | str, source: str, *, empty_ok: bool) -> dict[str, Any]:
    """A config's text -> its mapping; every way it can be wrong is one ConfigError naming `source`."""
    value = safe_yaml(data, source)
    if value is None:
        if not empty_ok:
            raise ConfigError(f"{source} is empty; it should hold the run's config mapping")
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{source} must be a mapping at the top level, not {type(value).__name__}")
    return value


def safe_yaml(data: bytes | str, source: str) -> Any:
    """yaml.safe_load (plain data only), refusing non-UTF-8 bytes, YAML errors and cyclic or
    absurdly deep values (a self-referencing alias such as `&a [*a]`) in one line each."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ConfigError(f"{source} is not UTF-8 text (byte {data[error.start]:#04x} at offset "
                              f"{error.start})") from None
    try:
        value = yaml.safe_load(data)
    except yaml.YAMLError as error:
        raise ConfigError(f"{source} is not valid YAML: {' '.join(str(error).split())}") from None
    except RecursionError:
        raise ConfigError(f"{source} is nested too deeply") from None
    _check_plain(value, source, depth=0, open_ids=set())
    return value


def _check_plain(value: Any, source: str, *, depth: int, open_ids: set[int]) -> None:
    if not isinstance(value, (dict, list)):
        return
    if id(value) in open_ids:
        raise ConfigError(f"{source}: a YAML alias refers to itself (a cyclic value cannot be a config value)")
    if depth > MAX_YAML_DEPTH:
        raise ConfigError(f"{source} is nested more than {MAX_YAML_DEPTH} levels deep")
    open_ids.add(id(value))
    for item in (list(value.keys()) + list(value.values())) if isinstance(value, dict) else value:
        _check_plain(item, source, depth=depth + 1, open_ids=open_ids)
    open_ids.discard(id(value))


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`key.sub=value` (value parsed as YAML) into a copy of `raw`.

    Setting a component's `name` (`predictor.name=id_vae`) starts that section afresh: the old
    component's options would not fit the new one. Name changes apply first, so options given
    next to them on the same command line stay, whatever their order.
    """
    raw = copy.deepcopy(raw)
    parsed = [_parse_override(item) for item in overrides]
    renames = [(parts, value) for parts, value in parsed if len(parts) == 2 and parts[1] == "name"
               and parts[0] in COMPONENT_SECTIONS]
    for (section, _), value in renames:
        current = raw.get(section)
        current_name = current.get("name") if isinstance(current, dict) else current
        if current_name != value:
            raw[section] = {"name": value}
    for parts, value in parsed:
        set_dotted(raw, parts, value, what=f"override {'.'.join(parts)}={value!r}")
    return raw


def set_dotted(raw: dict[str, Any], parts: list[str], value: Any, *, what: str) -> None:
    """raw[a][b][c] = value for parts [a, b, c], creating sections; in place."""
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if isinstance(child, str) and part in COMPONENT_SECTIONS and node is raw:
            child = {"name": child}  # `predictor: beta` shorthand, now with options
        elif child is None:
            child = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{what}: {part!r} is not a section")
        node[part] = child
        node = child
    node[parts[-1]] = value


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. predictor.decay=0.8)")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r} has an empty key part")
    return parts, safe_yaml(value, f"override {key.strip()}") if value.strip() else None


def validate_config(raw: dict[str, Any]) -> RunConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping at the top level, not {type(raw).__name__}")
    try:
        return RunConfig(**raw)
    except ValidationError as error:
        raise ConfigError("invalid config: " + format_errors(error)) from None


def load_config(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    return validate_config(apply_overrides(read_config_source(name_or_path), overrides))


def config_to_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
