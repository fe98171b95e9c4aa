"""The command line: run, ablate, bench and configs; user errors exit 2 with one clear line."""

import json

import pandas as pd

from mpts.training.cli import main

SMALL = ["--set", "steps=4", "--set", "batch_size=8", "--set", "candidate_ratio=2",
         "--set", "env.num_prompts=100", "--set", "env.eval_prompts=50"]


def test_run_and_resume_commands(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "quickstart", "--out", str(out), *SMALL]) == 0
    assert "run folder" in capsys.readouterr().out
    assert (out / "trace.parquet").exists()
    assert main(["run", "--resume", str(out)]) == 0
    assert main(["run", "--resume", str(out), "--set", "steps=9"]) == 2


def test_bad_config_exits_2_naming_the_field(tmp_path, capsys):
    assert main(["run", "quickstart", "--out", str(tmp_path / "x"), "--set", "predictor.decai=0.1"]) == 2
    assert "predictor: decai: unknown key" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_ablate_command_writes_table_and_runs(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "name: tiny\nsteps: 4\nbatch_size: 8\ncandidate_ratio: 2\nenv: {name: sim, num_prompts: 100, eval_prompts: 50}\n"
        "ablation: {seeds: [0, 1], workers: 2, arms: [{predictor: beta, acquisition: uniform},"
        " {predictor: beta, acquisition: thompson_target}]}\n")
    out = tmp_path / "abl"
    assert main(["ablate", str(config), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "thompson_target" in printed and "ablation folder" in printed
    runs = pd.read_parquet(out / "runs.parquet")
    assert len(runs) == 4 and set(runs["seed"]) == {0, 1}
    assert (out / "runs" / "beta__uniform__seed1" / "trace.parquet").exists()
    table = (out / "table.md").read_text()
    assert "| beta | uniform |" in table and "final eval acc" in table
    assert "greedy" not in table  # the simulator has no greedy/sampled accuracy: no empty columns
    # a second call reuses finished runs
    assert main(["ablate", str(config), "--out", str(out)]) == 0


def test_bench_prints_figures(capsys):
    assert main(["bench", "--pool", "20000", "--candidates", "512", "--batch", "64", "--steps", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pool"] == 20000 and result["median_ms_per_step"] > 0
    assert result["state_bytes_per_prompt"] == 8.0


def test_configs_lists_quickstart(capsys):
    assert main(["configs"]) == 0
    assert "quickstart" in capsys.readouterr().out.split()


def test_bench_background_load_reports_quiet_loaded_and_slowdown(capsys):
    assert main(["bench", "--pool", "20000", "--candidates", "512", "--batch", "64", "--steps", "4",
                 "--background-load", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["background_load"] == 2 and result["threads"] == 1
    assert result["quiet_median_ms_per_step"] > 0 and result["loaded_median_ms_per_step"] > 0
    assert result["slowdown"] == result["loaded_median_ms_per_step"] / result["quiet_median_ms_per_step"]


def test_predictor_threads_apply_to_the_hot_paths_only(monkeypatch, tmp_path):
    import torch

    import mpts.training.loop as loop
    from mpts.training.config import load_config

    seen = []
    real = loop.Selector.observe

    def observe(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(self, *args, **kwargs)
    monkeypatch.setattr(loop.Selector, "observe", observe)
    torch.set_num_threads(2)
    try:
        loop.run(load_config("quickstart", ["steps=2", "env.num_prompts=600", "predictor_threads=1"]), tmp_path / "a")
        assert seen == [1, 1] and torch.get_num_threads() == 2  # restored after each call
        seen.clear()
        loop.run(load_config("quickstart", ["steps=2", "env.num_prompts=600", "predictor_threads=null"]), tmp_path / "b")
        assert seen == [2, 2]
    finally:
        torch.set_num_threads(1)
