"""The report's selection-by-level section and the predictor's share of wall time."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_runs import write_run  # noqa: E402

from mpts.inference.schema import LEVELS_FILE  # noqa: E402
from mpts.reports import export_report  # noqa: E402
from mpts.reports.levels import level_shares, pooled_shares, read_levels, thirds  # noqa: E402
from mpts.reports.measures import predictor_time_share  # noqa: E402

POOL = 300


def test_level_shares_are_the_window_shares_of_rolled_out_prompts():
    levels = np.array([0, 1, 1, 2])
    trace = pd.DataFrame({"step": [0, 0, 1, 1, 2, 2, 3, 3], "prompt_id": [0, 1, 2, 3, 0, 0, 1, 3]})
    shares = level_shares(trace, levels, window=2)
    assert shares.loc[0].to_dict() == {0: 0.25, 1: 0.5, 2: 0.25}
    assert shares.loc[2].to_dict() == {0: 0.5, 1: 0.25, 2: 0.25}
    other = pd.DataFrame({1: [1.0]}, index=[0])  # a seed that rolled out level 1 only, in one window
    pooled = pooled_shares([shares, other])
    assert pooled.loc[0].to_dict() == {0: 0.125, 1: 0.75, 2: 0.125}
    assert pooled.loc[2].to_dict() == {0: 0.5, 1: 0.25, 2: 0.25}  # only the first seed has this window
    assert thirds(shares) == {0: (0.25, 0.5), 1: (0.5, 0.25), 2: (0.25, 0.25)}
    with pytest.raises(ValueError, match="outside the 4 levels"):
        level_shares(trace.assign(prompt_id=trace["prompt_id"] + 1), levels, window=2)


def test_levels_file_is_read_when_present_and_refused_when_malformed(tmp_path):
    assert read_levels(tmp_path) is None
    (tmp_path / LEVELS_FILE).write_text(json.dumps({"levels": [2, 0, 1]}))
    assert read_levels(tmp_path).tolist() == [2, 0, 1]
    for bad in ({"levels": [1, "2"]}, {"levels": []}, {"other": [1]}, {"levels": [True]}):
        (tmp_path / LEVELS_FILE).write_text(json.dumps(bad))
        with pytest.raises(ValueError, match="one integer level per pool prompt"):
            read_levels(tmp_path)


def test_predictor_share_is_predict_plus_observe_over_the_runs_wall_time():
    metrics = pd.DataFrame({"predict_seconds": [0.1, 0.3], "observe_seconds": [0.2, 0.4],
                            "wall_seconds": [2.0, 5.0]})
    assert predictor_time_share(metrics) == pytest.approx(1.0 / 5.0)
    assert np.isnan(predictor_time_share(metrics.drop(columns="observe_seconds")))


def test_report_shows_selection_by_level_and_predictor_share(tmp_path):
    runs = []
    for rule in ("uniform", "thompson_target"):
        for seed in (0, 1):
            run = write_run(tmp_path / "abl" / "runs" / f"{rule}{seed}", predictor="beta", acquisition=rule,
                            seed=seed, steps=12, pool_size=POOL)
            levels = [i % 3 for i in range(POOL)]
            (run / LEVELS_FILE).write_text(json.dumps({"levels": levels}))
            runs.append(run)
    summary = export_report([tmp_path / "abl"], tmp_path / "out", window_steps=4)
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "Selection by difficulty level" in markdown and "figures/selection_by_level.png" in markdown
    assert (tmp_path / "out" / "figures" / "selection_by_level.png").stat().st_size > 1000
    assert "predictor share of wall time" in markdown
    group = next(g for g in summary["groups"] if g["group"] == "beta · uniform")
    by_window = group["selection_by_level"]
    assert [row["window_start"] for row in by_window] == [0, 4, 8]
    trace = pd.concat([pd.read_parquet(r / "trace.parquet") for r in runs[:2]])
    first = trace[trace["step"] < 4]
    expected = np.mean([np.mean((t["prompt_id"] % 3) == 1) for _, t in
                        zip((0, 1), [pd.read_parquet(r / "trace.parquet").query("step < 4") for r in runs[:2]])])
    assert len(first) and by_window[0]["1"] == pytest.approx(expected)
    metrics = [pd.read_parquet(r / "metrics.parquet") for r in runs[:2]]
    shares = [(m["predict_seconds"].sum() + m["observe_seconds"].sum()) / m["wall_seconds"].iloc[-1] for m in metrics]
    assert group["estimates"]["predictor_time_share"]["mean"] == pytest.approx(np.mean(shares))


def test_report_without_levels_has_no_level_section(tmp_path):
    write_run(tmp_path / "abl" / "runs" / "one", predictor="beta", acquisition="uniform", seed=0, steps=6)
    summary = export_report([tmp_path / "abl"], tmp_path / "out")
    assert "selection_by_level" not in summary["groups"][0]
    assert "Selection by difficulty level" not in (tmp_path / "out" / "report.md").read_text()
