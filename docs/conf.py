"""Sphinx configuration for the mpts documentation (built by `make docs`).

The build treats every warning as an error (`-W -n` in the Makefile): a broken cross-reference,
a MyST link to a missing page or heading, or an autodoc import failure stops it. External links
are never fetched (no network in CI).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "docs"))

project = "mpts"
author = "mpts contributors"
copyright = "2026, mpts contributors"

extensions = [
    "myst_nb",                      # MyST markdown pages and the notebooks (rendered, never executed)
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]

# Notebooks are stored without outputs and run in the test suite; the docs show them as they are.
nb_execution_mode = "off"
# Headings get anchors so `page.md#heading` links are checked like page links.
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence", "deflist"]
suppress_warnings = ["myst.header"]  # pages included from the repository start below h1 in places

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "notebooks/README.md", "notebooks/data"]

html_theme = "furo"
html_title = "mpts"
html_static_path: list[str] = []

# API reference: autosummary writes one page per module from the docstrings.
autosummary_generate = True
autosummary_imported_members = False
# Members defined in each module only (a package's re-exports would be documented twice).
autodoc_default_options = {"members": True, "undoc-members": True, "show-inheritance": True,
                           "ignore-module-all": True}
autodoc_typehints = "description"
autodoc_member_order = "bysource"
# verl (and hydra, omegaconf) are installed only in verl's own virtualenv (make test-verl); the
# adapter is documented from its docstrings without them. vllm is not mocked: TRL reads its version.
autodoc_mock_imports = ["verl", "hydra", "omegaconf"]

# Nitpicky mode checks every cross-reference; types that belong to other libraries have no target
# here (no intersphinx: nothing is fetched), so those and only those are ignored.
nitpicky = True
_EXTERNAL = (r"(torch|pyro|numpy|np|pandas|pd|pyarrow|pydantic|scipy|gpytorch|transformers|trl|"
             r"datasets|ray|matplotlib|arviz|xarray|jinja2|yaml|rich|psutil|verl|vllm|omegaconf|"
             r"collections|typing|typing_extensions|pathlib|concurrent|multiprocessing|subprocess|"
             r"os|io|enum|dataclasses|abc|argparse|threading|queue|random|json|contextlib|functools|"
             r"logging|types|hashlib|builtins|weakref|tempfile|signal|re)(\..+)?")
nitpick_ignore_regex = [
    ("py:.*", _EXTERNAL),
    ("py:.*", r"annotated_types\..*|\w+=.*"),  # pydantic Field constraints shown in signatures (ge=1, ...)
    # names that other libraries' annotations bring in unqualified
    ("py:.*", r"Tensor|Path|Module|nn\.Module|ExpandedDistribution|_DependentProperty|FieldInfo|Ge|Le|Gt|Lt|"
              r"fractions\..*|pydantic_core\..*|string|T|.*\.T"),
    # type aliases (config.Seed, arithmetic.Operator, rewards.MissingRewards) that autodoc prints by their bare name
    ("py:.*", r"Seed|Operator|MissingRewards"),
    # annotation texts that are not names at all (constraint descriptions, quoted forward references)
    ("py:.*", r".*[ '].*"),
]


def _include_security_policy(app, docname, source):
    """The security page shows SECURITY.md from the repository root when the file is there."""
    if docname == "security" and (ROOT / "SECURITY.md").is_file():
        source[0] += "\n```{include} ../SECURITY.md\n:heading-offset: 1\n```\n"


def setup(app):
    app.connect("source-read", _include_security_policy)
