"""Sweeps: `ablation.grid` crossed with arms and seeds; names, configs, table and report by grid point."""

import pandas as pd
import pytest
import yaml
from grid_helpers import tiny_grid

from mpts.training.ablate import ablate, aggregate
from mpts.training.cli import main
from mpts.training.config import ConfigError, validate_config
from mpts.training.sweep import expand_grid

ARMS = [{"predictor": "beta", "acquisition": "uniform"}, {"predictor": "beta", "acquisition": "thompson_target"}]


def test_grid_crosses_arms_points_and_seeds_and_records_the_point():
    config = validate_config(tiny_grid(arms=ARMS, grid={"acquisition.target": [0.3, 0.5],
                                                        "candidate_ratio": [2, 3], "predictor.decay": [0.8]}))
    runs = expand_grid(config)
    # uniform has no `target`: 1 x 2 x 1 points for it, 2 x 2 x 1 for Thompson; x 2 seeds
    assert len(runs) == (2 + 4) * 2
    by_name = {run.name: run for run in runs}
    run = by_name["beta__thompson_target__acquisition.target=0.3__candidate_ratio=3__predictor.decay=0.8__seed1"]
    assert run.config.acquisition.options["target"] == 0.3
    assert (run.config.candidate_ratio, run.config.seed, run.config.predictor.options["decay"]) == (3, 1, 0.8)
    assert run.config.ablation.point == {"acquisition.target": 0.3, "candidate_ratio": 3, "predictor.decay": 0.8}
    uniform = by_name["beta__uniform__candidate_ratio=2__predictor.decay=0.8__seed0"]
    assert "target" not in uniform.config.acquisition.options
    assert uniform.config.ablation.point == {"candidate_ratio": 2, "predictor.decay": 0.8}


def test_no_grid_keeps_the_old_run_names():
    runs = expand_grid(validate_config(tiny_grid(arms=ARMS)))
    assert [r.name for r in runs] == ["beta__uniform__seed0", "beta__uniform__seed1",
                                      "beta__thompson_target__seed0", "beta__thompson_target__seed1"]


@pytest.mark.parametrize("grid, message", [
    ({"predictor.decai": [0.5]}, "predictor.decai is an option of none of the arms"),
    ({"stepz": [1]}, "'stepz' is not a config key"),
    ({"seed": [1, 2]}, "seed cannot be swept"),
    ({"ablation.workers": [1]}, "ablation.workers cannot be swept"),
    ({"steps": []}, "steps has no values"),
    ({"steps": [2, 2]}, "steps repeats a value"),
    ({"predictor..decay": [0.5]}, "has an empty part"),
    ({"predictor.decay": [0.5, 1.5]}, "run beta__uniform__predictor.decay=1.5__seed0: .*decay"),
    ({"steps": [2, 0]}, "run beta__uniform__steps=0__seed0: .*steps"),
])
def test_bad_grids_are_refused_naming_the_key(grid, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        ablate(validate_config(tiny_grid(arms=ARMS, grid=grid)), tmp_path / "abl", show_progress=False)
    assert not (tmp_path / "abl").exists()  # nothing written for a grid that does not expand


def test_sweep_end_to_end_table_runs_and_report_group_by_point(tmp_path, capsys):
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(tiny_grid(arms=ARMS, grid={"acquisition.target": [0.3, 0.5],
                                                                "candidate_ratio": [2, 3]})))
    out = tmp_path / "abl"
    assert main(["ablate", str(config), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| predictor | acquisition | acquisition.target | candidate_ratio |" in printed
    runs = pd.read_parquet(out / "runs.parquet")
    assert len(runs) == 12 and runs["run"].is_unique
    assert set(runs["grid.candidate_ratio"]) == {"2", "3"}
    assert set(runs.loc[runs["acquisition"] == "uniform", "grid.acquisition.target"]) == {""}
    table = (out / "table.md").read_text()
    assert "| beta | thompson_target | 0.5 | 3 |" in table and "| beta | uniform | · | 2 |" in table
    main_table = table.split("\n\n")[0].strip().splitlines()
    assert len(main_table) == 2 + 6  # header, rule, one row per arm x point
    # paired differences are taken with the uniform arm at the same grid point
    paired = aggregate(runs).set_index(["acquisition", "grid.acquisition.target", "grid.candidate_ratio"])
    for target in ("0.3", "0.5"):
        for ratio in ("2", "3"):
            mine = runs[(runs["acquisition"] == "thompson_target") & (runs["grid.acquisition.target"] == target)
                        & (runs["grid.candidate_ratio"] == ratio)].set_index("seed")["final_eval_accuracy"]
            base = runs[(runs["acquisition"] == "uniform") & (runs["grid.candidate_ratio"] == ratio)].set_index("seed")
            expected = (mine - base["final_eval_accuracy"]).mean()
            got = paired.loc[("thompson_target", target, ratio), "vs_uniform.final_eval_accuracy"]
            assert got == pytest.approx(expected, abs=1e-12)
    recorded = yaml.safe_load((out / "runs" / "beta__uniform__candidate_ratio=3__seed0" / "config.yaml").read_text())
    assert recorded["candidate_ratio"] == 3 and recorded["ablation"]["point"] == {"candidate_ratio": 3}

    # re-running redoes nothing: finished folders are untouched
    trace = out / "runs" / "beta__uniform__candidate_ratio=3__seed0" / "trace.parquet"
    stamp = trace.stat().st_mtime_ns
    assert main(["ablate", str(config), "--out", str(out)]) == 0
    assert trace.stat().st_mtime_ns == stamp

    from mpts.reports.runs import load_runs
    loaded, _ = load_runs([out])
    groups = {run.group for run in loaded}
    assert len(groups) == 6 and "beta · uniform · candidate_ratio=3" in groups
    assert "beta · thompson_target(target=0.3) · candidate_ratio=2" in groups


def test_report_baseline_is_the_uniform_group_at_the_same_grid_point():
    from mpts.reports.measures import _baseline_group

    def row(predictor, rule, **point):
        return [{"acquisition": rule, "predictor_label": predictor, "point": point}]

    groups = {"a": row("beta", "uniform", candidate_ratio="2"), "b": row("beta", "uniform", candidate_ratio="3"),
              "c": row("hmm3", "uniform", candidate_ratio="3"),
              "d": row("beta", "thompson_target", candidate_ratio="3", **{"acquisition.target": "0.3"})}
    # uniform takes no `target`: its point is a part of the Thompson arm's
    assert _baseline_group(groups, "beta", "uniform", groups["d"][0]["point"]) == "b"
    assert _baseline_group(groups, "hmm3", "uniform", {"candidate_ratio": "2"}) == "a"
    assert _baseline_group(groups, "hmm3", "uniform", {"candidate_ratio": "3"}) == "c"
    assert _baseline_group(groups, "hmm3", "uniform", None) == "c"  # no grid: same predictor
