"""scripts/sim_to_real.py end to end, on a "real" ablation that is itself the simulator: the fit to
its uniform runs must predict the real arms' effective ratios, and the real figures must be read
from the real ablation's report as they are."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mpts.training.cli import main

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "sim_to_real.py"
REAL = {"name": "realsim", "steps": 40, "batch_size": 16, "candidate_ratio": 4, "k": 8, "target_accuracy": 0.45,
        "eval_every": 2, "env": {"name": "sim", "num_prompts": 300, "num_clusters": 3},
        "predictor": {"name": "beta", "decay": 0.9}, "acquisition": "uniform",
        "ablation": {"seeds": [0, 1], "workers": 1,
                     "arms": [{"predictor": "beta", "acquisition": "uniform"},
                              {"predictor": "beta", "acquisition": "thompson_target"}]}}


@pytest.mark.slow
def test_the_fitted_simulator_predicts_a_simulated_ablation(tmp_path):
    config = tmp_path / "real.yaml"
    config.write_text(yaml.safe_dump(REAL))
    assert main(["ablate", str(config), "--out", str(tmp_path / "real")]) == 0
    assert main(["report", str(tmp_path / "real"), "--out", str(tmp_path / "report")]) == 0
    uniform = [str(tmp_path / "real" / "runs" / f"beta__uniform__seed{s}") for s in (0, 1)]
    out = tmp_path / "s2r"
    subprocess.run([sys.executable, str(SCRIPT), "--real", str(tmp_path / "report" / "summary.json"),
                    "--uniform", *uniform, "--out", str(out), "--workers", "1"], check=True, capture_output=True)
    result = json.loads((out / "comparison.json").read_text())
    arms = {row["arm"]: row for row in result["arms"]}
    assert set(arms) == {"beta__uniform", "beta__thompson_target"}
    real_summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    real_uniform = [r["mean_effective_ratio"] for r in real_summary["runs"] if r["run"].startswith("beta__uniform")]
    assert arms["beta__uniform"]["real_effective_ratio"]["mean"] == pytest.approx(sum(real_uniform) / 2)
    for arm in arms.values():  # the simulator fitted to its own uniform runs predicts every arm
        assert arm["sim_effective_ratio"]["mean"] == pytest.approx(arm["real_effective_ratio"]["mean"], abs=0.1), arm
    assert set(result["fits"]) == {"0", "1"} and (out / "seed0" / "sim.yaml").is_file()
    assert (out / "comparison.md").read_text().startswith("| arm |")
