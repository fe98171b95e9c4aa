"""Importing mpts changes no process-wide Pyro (or torch) setting: every module of the package is
imported in a fresh interpreter and the settings are compared before and after."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "inference", "training", "reports", "integrations")  # mpts.<folder>, as pyproject maps them

SCRIPT = r"""
import importlib, json, sys
from pathlib import Path
import pyro, pyro.distributions, pyro.infer.util, pyro.poutine.runtime, torch

def settings():
    return {"pyro.settings": dict(pyro.settings.get()),
            "infer validation": pyro.infer.util.is_validation_enabled(),
            "distribution validation": pyro.distributions.is_validation_enabled(),
            "torch distribution validation": torch.distributions.Distribution._validate_args,
            "param store": sorted(pyro.get_param_store().keys()),
            "poutine stack": len(pyro.poutine.runtime._PYRO_STACK),
            "default dtype": str(torch.get_default_dtype()),
            "grad enabled": torch.is_grad_enabled()}

from mpts.models.extras import MissingExtraError
before = settings()
imported, missing_extras = [], []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
        imported.append(name)
    except ImportError as error:  # an optional dependency (the message names the mpts extra): fine
        if not (isinstance(error, MissingExtraError) or "pip install 'mpts[" in str(error)):
            raise
        missing_extras.append(name)
print(json.dumps({"before": before, "after": settings(), "imported": imported, "missing_extras": missing_extras}))
"""


def package_modules() -> list[str]:
    names = []
    for folder in PACKAGES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = ("mpts",) + path.relative_to(ROOT).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_importing_every_mpts_module_leaves_pyro_and_torch_settings_as_they_were():
    modules = package_modules()
    assert len(modules) > 50 and "mpts.inference.streaming" in modules and "mpts.integrations.trl" in modules
    done = subprocess.run([sys.executable, "-c", SCRIPT, *modules], capture_output=True, text=True, timeout=600,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result["imported"]) + len(result["missing_extras"]) == len(modules)
    assert len(result["imported"]) > 50, result["missing_extras"]
    assert result["after"] == result["before"], {key: (result["before"][key], value)
                                                 for key, value in result["after"].items()
                                                 if result["before"][key] != value}
