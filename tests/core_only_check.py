"""Run by `make test-core` inside a fresh virtualenv holding `pip install mpts` and nothing else.

Not a pytest module (pytest is not installed there): a script that exits non-zero on the first
broken promise of the core install.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HEAVY = ("transformers", "gpytorch", "matplotlib", "arviz", "math_verify", "trl", "safetensors")  # jinja2 comes with torch


def main() -> None:
    present = [name for name in HEAVY if importlib.util.find_spec(name) is not None]
    assert not present, f"the core install pulled in optional packages: {present}"

    import mpts.models  # noqa: F401
    from mpts.models.extras import MissingExtraError
    from mpts.models.registry import get_predictor_class

    try:
        get_predictor_class("gp")
    except MissingExtraError as error:
        assert "mpts[gp]" in str(error), error
    else:
        raise AssertionError("'gp' imported without gpytorch")

    mpts = Path(sys.executable).with_name("mpts")
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.csv"
        rows = ["step,prompt_id,successes,trials"] + [f"{s},{i},{(s + i) % 5},4" for s in range(4) for i in range(6)]
        trace.write_text("\n".join(rows) + "\n")
        out = Path(folder) / "scores.json"
        done = subprocess.run([str(mpts), "replay", str(trace), "--predictor", "beta", "--out", str(out)],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        scores = json.loads(out.read_text())
        assert scores["predictor"] == "beta" and scores["steps"] == 4, scores

        # a per-rollout log with prompt texts: beta needs no embeddings, so no extra either
        rollouts = Path(folder) / "rollouts.csv"
        rollouts.write_text("step,prompt,reward\n" + "".join(f"{s},p{i},{(s + i + j) % 2}\n"
                                                          for s in range(1, 4) for i in range(3) for j in range(4)))
        done = subprocess.run([str(mpts), "replay", str(rollouts), "--predictor", "beta"], capture_output=True, text=True)
        assert done.returncode == 0 and json.loads(done.stdout)["rows"] == 9, done.stderr

        report = subprocess.run([str(mpts), "report", folder, "--out", str(Path(folder) / "r")],
                                capture_output=True, text=True)
        lines = report.stderr.strip().splitlines()
        assert report.returncode == 2 and len(lines) == 1 and "mpts[reports]" in lines[0], report.stderr
    print("core-only install: imports mpts.models, replays a trace and a prompt log with beta, no optional packages")


if __name__ == "__main__":
    main()
