"""`mpts fit-sim`: the simulated learner's parameters are recovered from traces it generated, the
reported intervals cover them, a trace the simulator cannot produce is flagged, and the command
reads every trace shape replay reads."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from mpts.training.cli import main
from mpts.training.config import load_config
from mpts.training.environments.simulator import SimulatedLearner, SimulatorOptions
from mpts.training.fit_sim import fit, fit_data, predictive_check, read_fit_input

# A small world, so each fit takes seconds: 3 clusters, 400 prompts, 60 steps of 48 groups of 8.
WORLD = dict(num_prompts=400, num_clusters=3, learning_rate=0.45, transfer=0.5, slope=1.5,
             difficulty_mean=1.2, cluster_spread=3.0, difficulty_std=1.5)


def simulated_trace(seed: int, steps: int = 60, batch: int = 48, k: int = 8, **changes):
    env = SimulatedLearner(SimulatorOptions(**{**WORLD, **changes}), seed=seed)
    pick = torch.Generator().manual_seed(seed + 1000)
    rows = []
    for step in range(steps):
        ids = torch.randperm(env.options.num_prompts, generator=pick)[:batch]
        outcome = env.rollout(ids, k)
        env.train_on(outcome)
        rows.append(pd.DataFrame({"step": step, "prompt_id": ids.numpy(), "trials": k,
                                  "successes": outcome.successes.numpy().astype(np.int64)}))
    clusters = {i: int(c) for i, c in enumerate(env.clusters.tolist())}
    return pd.concat(rows, ignore_index=True), clusters, env


def truth_in_logit_units(env) -> dict[str, float]:
    """The identified combinations: slope times learning rate and difficulty spread."""
    o = env.options
    return {"learning_rate": o.slope * o.learning_rate, "transfer": o.transfer,
            "difficulty_std": o.slope * o.difficulty_std}


@pytest.fixture(scope="module")
def fits():
    out = []
    for seed in range(4):
        trace, clusters, env = simulated_trace(seed)
        result = fit(fit_data(trace, clusters), seed=seed)
        out.append((result, env))
    return out


def every_truth(env) -> dict[str, float]:
    truth = truth_in_logit_units(env)
    return truth | {f"cluster_difficulty[{c}]": float(env.options.slope * m) for c, m in enumerate(env.cluster_means)}


def test_parameters_are_recovered_within_their_stated_uncertainty(fits):
    for result, env in fits:
        table = result.parameters().set_index("parameter")
        for name, true in every_truth(env).items():
            z = (table.loc[name, "mean"] - true) / table.loc[name, "sd"]
            assert abs(z) < 3.5, (name, table.loc[name, "mean"], table.loc[name, "sd"], true)
        # and the estimates are informative: learning rate and spread to within 30% (one sd)
        for name in ("learning_rate", "difficulty_std"):
            assert table.loc[name, "sd"] < 0.3 * every_truth(env)[name], (name, table.loc[name, "sd"])


def test_reported_90_percent_intervals_cover_the_truth(fits):
    hits = []
    for result, env in fits:
        table = result.parameters().set_index("parameter")
        hits += [table.loc[name, "q05"] <= value <= table.loc[name, "q95"] for name, value in every_truth(env).items()]
    # 24 intervals at nominal 0.9: 0.9 +- 3 se is 0.72..1.0; the share must not fall below it
    assert np.mean(hits) >= 0.72, hits


def test_the_predictive_check_passes_a_well_specified_trace(fits):
    for result, _ in fits[:2]:
        _, verdict = predictive_check(result)
        assert not verdict["misfit"], verdict


def test_a_sudden_jump_the_fit_does_not_model_is_flagged():
    trace, clusters, _ = simulated_trace(7, jump_step=30, jump_size=-3.0)
    result = fit(fit_data(trace, clusters), seed=7)
    check, verdict = predictive_check(result)
    assert verdict["misfit"] and verdict["success_rate"]["flagged"], verdict
    assert {"success_rate", "success_rate_q05", "success_rate_q95"} <= set(check.columns)


def test_a_ceiling_below_one_is_recovered_and_caps_the_simulator():
    """A learner that keeps making errors on what it has learned (p <= ceiling < 1): the
    simulator never exceeds the ceiling, and the fit recovers it within its stated interval."""
    trace, clusters, env = simulated_trace(5, ceiling=0.8, learning_rate=0.9)
    assert float(env.true_success(torch.arange(env.options.num_prompts)).max()) <= 0.8 + 1e-6
    table = fit(fit_data(trace, clusters), seed=5).parameters().set_index("parameter")
    assert table.loc["ceiling", "q05"] <= 0.8 <= table.loc["ceiling", "q95"], table.loc["ceiling"]
    assert table.loc["ceiling", "q95"] < 0.95  # told apart from no ceiling


def test_one_cluster_says_transfer_is_not_identified():
    trace, _, _ = simulated_trace(3, num_clusters=1, steps=30)
    result = fit(fit_data(trace, None))
    identified = result.parameters().set_index("parameter")["identified"]
    assert identified["transfer"].startswith("no:")
    assert identified["forgetting"].startswith("no:")  # no cluster ever starved in this trace
    assert identified["learning_rate"] == "yes"


# -- the command -----------------------------------------------------------------------------------
def _fit_sim(args, capsys):
    code = main(["fit-sim", *map(str, args), "--max-iterations", "100"])
    return code, capsys.readouterr()


def test_fit_sim_on_an_mpts_run_folder_writes_a_config_mpts_run_accepts(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["run", "quickstart", "--out", str(run), "--set", "steps=25", "--set", "env.num_prompts=300",
                 "--set", "batch_size=32", "--set", "predictor.decay=1.0"]) == 0
    out = tmp_path / "sim.yaml"
    code, printed = _fit_sim([run, "--out", out], capsys)
    assert code == 0, printed.err
    config = load_config(str(out), [])
    assert config.env.name == "sim" and config.steps == 25 and config.batch_size == 32
    assert len(config.env.options["cluster_difficulties"]) == 8  # the simulator's own clusters, rebuilt
    fitted = json.loads(out.with_suffix(".fit.json").read_text())
    assert {p["parameter"] for p in fitted["parameters"]} >= {"learning_rate", "transfer", "difficulty_std"}
    assert "mpts fit-sim" in out.read_text().splitlines()[0]
    assert len(pd.read_csv(out.with_suffix(".check.csv"))) == 25


def test_fit_sim_reads_a_verl_dump_and_a_per_rollout_csv(tmp_path, capsys):
    trace, _, _ = simulated_trace(1, steps=20, batch=24, k=4)
    rollouts = trace.loc[trace.index.repeat(trace["trials"])].copy()
    rollouts["rank"] = rollouts.groupby(["step", "prompt_id"]).cumcount()
    rollouts["score"] = (rollouts["rank"] < rollouts["successes"]).astype(float)
    rollouts["prompt"] = "problem " + rollouts["prompt_id"].astype(str)
    table = tmp_path / "rollouts.csv"
    rollouts[["step", "prompt", "score"]].to_csv(table, index=False)
    dump = tmp_path / "dump"
    dump.mkdir()
    for step, rows in rollouts.groupby("step"):
        lines = [json.dumps({"input": p, "output": "", "score": s, "step": int(step)})
                 for p, s in zip(rows["prompt"], rows["score"])]
        (dump / f"{step}.jsonl").write_text("\n".join(lines) + "\n")
    outputs = []
    for source, out in ((table, tmp_path / "from-csv.yaml"), (dump, tmp_path / "from-verl.yaml")):
        code, printed = _fit_sim([source, "--out", out], capsys)
        assert code == 0, printed.err
        outputs.append(yaml.safe_load(out.read_text()))
    assert outputs[0]["env"] == outputs[1]["env"]  # the same rollouts, two shapes: one fit
    assert outputs[0]["steps"] == 20 and outputs[0]["k"] == 4 and outputs[0]["env"]["num_clusters"] == 1


def test_fit_sim_never_overwrites_and_refuses_in_one_line(tmp_path, capsys):
    trace, _, _ = simulated_trace(2, steps=5, batch=8)
    source = tmp_path / "trace.csv"
    trace.to_csv(source, index=False)
    taken = tmp_path / "mine.fit.json"
    taken.write_text("a user's file")
    code, printed = _fit_sim([source, "--out", tmp_path / "mine.yaml"], capsys)
    assert code == 2 and printed.err.count("\n") == 1 and "mine.fit.json exists" in printed.err
    assert taken.read_text() == "a user's file" and not (tmp_path / "mine.yaml").exists()
    code, printed = _fit_sim([tmp_path / "missing.csv"], capsys)
    assert code == 2 and "does not exist" in printed.err


def _run_folder_with_levels(tmp_path, seed: int = 4):
    """A simulated trace laid out as an LM run folder: config, trace and the pool's levels file
    (levels 1..3 for clusters 0..2, as the LM tasks number theirs)."""
    trace, clusters, env = simulated_trace(seed)
    run = tmp_path / "lm-run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"name": "lm-run", "seed": seed, "steps": 60, "batch_size": 48,
                                                      "k": 8, "env": {"name": "lm", "num_prompts": 400}}))
    trace.assign(kept=True, failed=False).to_parquet(run / "trace.parquet")
    levels = [clusters[i] + 1 for i in range(env.options.num_prompts)]
    (run / "prompt_levels.json").write_text(json.dumps({"levels": levels}))
    return run, env


def test_fit_sim_uses_a_run_folders_difficulty_levels_as_its_clusters(tmp_path, capsys):
    run, env = _run_folder_with_levels(tmp_path)
    out = tmp_path / "sim.yaml"
    code, printed = _fit_sim([run, "--out", out], capsys)
    assert code == 0, printed.err
    fitted = json.loads(out.with_suffix(".fit.json").read_text())
    assert fitted["clusters"] == 3 and fitted["cluster_labels"] == [1, 2, 3]
    rows = {p["parameter"]: p for p in fitted["parameters"]}
    assert rows["transfer"]["identified"] != "no: with one cluster only learning_rate * (1 + transfer) is identified"
    for c, mean in enumerate(env.cluster_means.tolist()):  # each level's difficulty, in logit units
        row = rows[f"cluster_difficulty[{c}]"]
        assert abs(row["mean"] - env.options.slope * mean) < 3.0 * row["sd"], (c, row, mean)
    # the spread within a level, which prompts put in the wrong level would widen
    spread = rows["difficulty_std"]
    assert abs(spread["mean"] - env.options.slope * env.options.difficulty_std) < 3.0 * spread["sd"], spread
    config = yaml.safe_load(out.read_text())["env"]
    assert config["num_clusters"] == 3
    assert read_fit_input(run, use_levels=False).num_clusters == 1  # the levels can be left out
    assert config["cluster_difficulties"] == [round(rows[f"cluster_difficulty[{c}]"]["mean"], 4) for c in range(3)]


@pytest.mark.parametrize("levels_text", ["{not json", "[1, 2]", '{"levels": [1, "hard"]}'])
def test_fit_sim_refuses_a_malformed_levels_file_in_one_line(tmp_path, capsys, levels_text):
    run, _ = _run_folder_with_levels(tmp_path, seed=2)
    (run / "prompt_levels.json").write_text(levels_text)
    out = tmp_path / "sim.yaml"
    code, printed = _fit_sim([run, "--out", out], capsys)
    assert code == 2 and printed.err.count("\n") == 1 and "prompt_levels.json" in printed.err, printed.err
    assert not any(tmp_path.glob("sim*"))


def test_a_start_that_stops_short_of_a_mode_is_retried_from_the_next_seed(monkeypatch):
    import mpts.training.fit_sim as fit_sim

    trace, clusters, _ = simulated_trace(3, steps=10, batch=16)
    data = fit_data(trace, clusters)
    real_fit_once, starts = fit_sim._fit_once, []

    def first_start_fails(data, signal, max_iterations, seed, num_draws, threads):
        starts.append(seed)
        draws, trace = real_fit_once(data, signal, max_iterations, seed, num_draws, threads)
        return (None if len(starts) == 1 else draws), trace

    monkeypatch.setattr(fit_sim, "_fit_once", first_start_fails)
    assert set(fit(data, seed=5, num_draws=20).draws) >= {"learning_rate", "ceiling"}
    assert starts == [5, 6]
    starts.clear()
    monkeypatch.setattr(fit_sim, "_fit_once", lambda *args: (starts.append(args[3]), (None, [0.0] * 7))[1])
    with pytest.raises(ValueError, match="no proper mode .* from 3 starts, after 7/7/7 evaluations"):
        fit(data, seed=0)
    assert starts == [0, 1, 2]
