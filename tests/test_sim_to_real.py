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
    # a target other than the runs' own (0.45): the simulated ablations must use the report's
    assert main(["report", str(tmp_path / "real"), "--out", str(tmp_path / "report"), "--target-accuracy", "0.4"]) == 0
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
    ran = out / "seed0" / "ablation" / "runs" / "beta__uniform__seed0" / "config.yaml"
    assert yaml.safe_load(ran.read_text())["target_accuracy"] == 0.4
    assert (out / "comparison.md").read_text().startswith("| arm |")


def test_recomputed_levels_match_those_the_lm_environment_records(tmp_path):
    """A run folder older than prompt_levels.json gets its pool's levels back from its config."""
    pytest.importorskip("transformers")
    sys.path.insert(0, str(SCRIPT.parent))
    from sim_to_real import recomputed_levels

    from mpts.inference.schema import LEVELS_FILE
    from mpts.training.environments.lm.env import LMEnvironment, LMOptions

    options = {"num_prompts": 60, "eval_prompts": 10, "max_new_tokens": 3,
               "tiny": {"hidden_size": 64, "num_layers": 1, "num_heads": 1, "num_kv_heads": 1, "intermediate_size": 128},
               "task_options": {"digit_counts": [1, 2, 3], "level": "digits"}}
    run = tmp_path / "run"
    LMEnvironment(LMOptions(**options), seed=3, run_dir=run).close()
    recorded = json.loads((run / LEVELS_FILE).read_text())["levels"]
    (run / "config.yaml").write_text(yaml.safe_dump({"seed": 3, "env": {"name": "lm", **options}}))
    assert recomputed_levels(run, tmp_path / "unused.csv") is None  # the recorded file wins
    (run / LEVELS_FILE).unlink()
    table = recomputed_levels(run, tmp_path / "levels.csv")
    import pandas as pd
    frame = pd.read_csv(table)
    assert list(frame["prompt_id"]) == list(range(60)) and list(frame["cluster"]) == recorded
    assert len(set(recorded)) == 3
