"""The report exporter over synthetic run folders: outputs, numbers, best marks, ArviZ export, browser."""

from __future__ import annotations

import base64
import html
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_runs import write_ablation, write_run  # noqa: E402

from mpts.inference.scoring import scores_by_window  # noqa: E402
from mpts.reports import export_report  # noqa: E402

PREDICTORS = ("beta", "id_vae")
RULES = ("uniform", "thompson_target")
SEEDS = (0, 1)
STEPS = 24
TARGET = 0.55
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def ablation(tmp_path_factory) -> Path:
    return write_ablation(tmp_path_factory.mktemp("ablation"), PREDICTORS, RULES, SEEDS, steps=STEPS,
                          target_accuracy=TARGET)


@pytest.fixture(scope="module")
def extra_runs(tmp_path_factory) -> list[Path]:
    """Plain run folders (not in an ablation) of the DAPO dynamic-sampling baseline for one predictor."""
    root = tmp_path_factory.mktemp("extra")
    return [write_run(root / f"ds{seed}", predictor="beta", acquisition="dynamic_sampling", seed=seed, steps=STEPS,
                      target_accuracy=TARGET) for seed in SEEDS]


@pytest.fixture(scope="module")
def report(ablation, extra_runs, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("report") / "out"
    return out, export_report([ablation, *extra_runs], out, window_steps=6)


def _run_dirs(ablation: Path) -> list[Path]:
    return sorted((ablation / "runs").iterdir())


GROUPS = [f"{p} · {r}" for p in PREDICTORS for r in RULES] + ["beta · dynamic_sampling"]


# -- files ---------------------------------------------------------------------------------------

def test_writes_html_markdown_json_figures_and_netcdf(report):
    out, summary = report
    assert "rollouts ÷ uniform (×)" in (out / "report.md").read_text()
    assert "rollouts ÷ dynamic sampling (×)" in (out / "report.md").read_text()
    assert json.loads((out / "summary.json").read_text()) == summary
    figures = summary["files"]["figures"]
    assert {"figures/reliability.png", "figures/pit.png", "figures/coverage.png", "figures/state_confusion.png",
            "figures/calibration_over_time.png", "figures/rollouts_to_target.png", "figures/accuracy_curves.png",
            "figures/effective_ratio.png", "figures/time_per_step.png", "figures/elbo.png"} == set(figures)
    for name in figures:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name

    markdown = (out / "report.md").read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert sorted(linked) == sorted(figures)

    page = (out / "report.html").read_text()
    sources = re.findall(r'<img[^>]*\ssrc="([^"]+)"', page)
    assert len(sources) == len(figures)
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        assert base64.b64decode(source.split(",", 1)[1])[:8] == PNG_MAGIC
    # self-contained: no external scripts, stylesheets, or links other than in-page anchors
    assert "<script" not in page and "<link" not in page
    assert all(h.startswith("#") for h in re.findall(r'\shref="([^"]*)"', page))
    assert not re.search(r"url\(|@import|https?://", page.split("<body>")[0])

    assert sorted(summary["files"]["netcdf"]) == sorted(f"posterior_{g.replace(' · ', '__')}.nc" for g in GROUPS)


# -- numbers -------------------------------------------------------------------------------------

def _recomputed(run_dir: Path, target: float = TARGET) -> dict:
    """The run's headline numbers straight from its parquet files, without the report's code."""
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    trace = pd.read_parquet(run_dir / "trace.parquet")
    ok = trace[~trace["failed"]]
    reached = metrics.loc[metrics["eval_accuracy"] >= target, "cumulative_rollouts"]
    return {
        "final_eval_accuracy": metrics["eval_accuracy"].dropna().iloc[-1],
        "rollouts_to_target": float(reached.iloc[0]) if len(reached) else None,
        "mean_effective_ratio": metrics["effective_ratio"].mean(),
        "total_rollouts": metrics["cumulative_rollouts"].iloc[-1],
        "wall_seconds": metrics["wall_seconds"].iloc[-1],
        "brier": np.mean((ok["pred_mean"] - ok["successes"] / ok["trials"]) ** 2),
        "log_predictive_density": ok["pred_log_prob"].mean(),
        "coverage90": np.mean((ok["pred_pit"] >= 0.05) & (ok["pred_pit"] <= 0.95)),
        "rows": len(ok),
        "predict_seconds": metrics["predict_seconds"].mean(),
        "sync_seconds": metrics["sync_seconds"].mean() if "sync_seconds" in metrics else None,
    }


def test_summary_numbers_match_the_recorded_metrics_and_trace(ablation, extra_runs, report):
    _, summary = report
    runs = {r["run"]: r for r in summary["runs"]}
    assert set(runs) == {d.name for d in [*_run_dirs(ablation), *extra_runs]}
    for run_dir in [*_run_dirs(ablation), *extra_runs]:
        expected, got = _recomputed(run_dir), runs[run_dir.name]
        for key in ("final_eval_accuracy", "mean_effective_ratio", "total_rollouts", "wall_seconds", "brier",
                    "log_predictive_density", "coverage90", "rows"):
            assert got[key] == pytest.approx(expected[key], rel=1e-9), (run_dir.name, key)
        assert got["rollouts_to_target"] == expected["rollouts_to_target"]
        assert got["time_per_step"]["predict_seconds"] == pytest.approx(expected["predict_seconds"])
        assert got["time_per_step"]["sync_seconds"] == pytest.approx(expected["sync_seconds"])
    assert summary["warnings"] == []


def test_groups_pool_seeds_with_t_intervals(report):
    _, summary = report
    assert [g["group"] for g in summary["groups"]] == sorted(GROUPS)
    for group in summary["groups"]:
        members = [r for r in summary["runs"] if r["group"] == group["group"]]
        assert sorted(group["seeds"]) == list(SEEDS) and len(members) == len(SEEDS)
        for key in ("final_eval_accuracy", "brier", "ece", "spearman_true", "auroc_informative"):
            estimate = group["estimates"][key]
            values = [r[key] for r in members]
            lo, hi = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
            assert (estimate["mean"], estimate["lo"], estimate["hi"]) == pytest.approx((np.mean(values), lo, hi))
            assert estimate["n"] == estimate["total"] == len(SEEDS)
        assert group["has_elbo"] == group["group"].startswith("id_vae")


def test_arms_are_compared_with_uniform_and_dynamic_sampling_seed_by_seed(report):
    _, summary = report
    groups = {g["group"]: g for g in summary["groups"]}
    runs = {(r["group"], r["seed"]): r for r in summary["runs"]}

    def per_seed(group, key):
        return np.array([runs[(group, seed)][key] for seed in SEEDS], dtype=float)

    for predictor in PREDICTORS:
        uniform = groups[f"{predictor} · uniform"]
        assert uniform["rollouts_ratio"]["uniform"]["mean"] == pytest.approx(1.0)
        chosen = f"{predictor} · thompson_target"
        ratio = groups[chosen]["rollouts_ratio"]["uniform"]
        assert ratio["baseline"] == f"{predictor} · uniform"  # same predictor's uniform arm
        logs = np.log(per_seed(chosen, "rollouts_to_target") / per_seed(ratio["baseline"], "rollouts_to_target"))
        lo, hi = stats.t.interval(0.95, len(SEEDS) - 1, loc=logs.mean(), scale=stats.sem(logs))
        assert (ratio["mean"], ratio["lo"], ratio["hi"]) == pytest.approx((np.exp(logs.mean()), np.exp(lo), np.exp(hi)))
        # only beta has a dynamic-sampling arm: every group is compared with it, paired by seed
        versus_dynamic = groups[chosen]["paired_differences"]["dynamic_sampling"]
        assert versus_dynamic["baseline"] == "beta · dynamic_sampling"
        for key in ("final_eval_accuracy", "mean_effective_ratio", "rollouts_to_target"):
            differences = per_seed(chosen, key) - per_seed("beta · dynamic_sampling", key)
            lo, hi = stats.t.interval(0.95, len(SEEDS) - 1, loc=differences.mean(), scale=stats.sem(differences))
            got = versus_dynamic[key]
            assert (got["mean"], got["lo"], got["hi"]) == pytest.approx((differences.mean(), lo, hi)), key


def test_paired_table_is_in_the_report(report):
    out, _ = report
    markdown = (out / "report.md").read_text()
    assert "Paired differences with the baseline arms" in markdown
    assert "| beta · thompson_target | beta · uniform |" in markdown.replace("\\", "")


def test_a_real_resumed_runs_summary_json_agrees_with_the_report_of_its_files(tmp_path):
    """The loop's summary.json (computed from its row buffers) against the report (from the final
    parquet files): a lost or duplicated row across the resume shows as a mismatch."""
    from mpts.training.config import load_config
    from mpts.training.loop import run

    config = load_config("quickstart", ["steps=9", "batch_size=8", "candidate_ratio=2", "env.num_prompts=100",
                                        "env.eval_prompts=50", "checkpoint_every=4", "target_accuracy=0.2"])

    def stop(done, total, metrics):
        if done == 6:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run(config, tmp_path / "r", progress=stop)
    run(None, tmp_path / "r", resume=True)
    summary = export_report([tmp_path / "r"], tmp_path / "out")
    got, expected = summary["runs"][0], _recomputed(tmp_path / "r", config.target_accuracy)
    assert got["summary_json_mismatches"] == [] and summary["warnings"] == []
    assert got["rows"] == expected["rows"] == 9 * 8
    for key in ("final_eval_accuracy", "total_rollouts", "brier", "log_predictive_density", "coverage90"):
        assert got[key] == pytest.approx(expected[key], rel=1e-9), key
    assert got["rollouts_to_target"] == expected["rollouts_to_target"] is not None


def test_reference_roles_are_read_from_the_runs_not_from_the_rule_registry(tmp_path):
    for seed in SEEDS:
        for rule, role in (("my_baseline", "baseline"), ("my_oracle", "sees_truth"), ("uniform", None)):
            folder = write_run(tmp_path / "abl" / "runs" / f"{rule}{seed}", predictor="beta", acquisition=rule,
                               seed=seed, steps=8)
            recorded = json.loads((folder / "summary.json").read_text())
            (folder / "summary.json").write_text(json.dumps({**recorded, "reference": role}))
    summary = export_report([tmp_path / "abl"], tmp_path / "out")
    groups = {g["acquisition"]: g for g in summary["groups"]}
    assert groups["my_oracle"]["reference"] and not groups["my_baseline"]["reference"]
    assert set(groups["uniform"]["rollouts_ratio"]) == {"my_baseline"}  # uniform recorded as no reference
    assert groups["uniform"]["paired_differences"]["my_baseline"]["baseline"] == "beta · my_baseline"


def test_reports_never_import_training(tmp_path):
    """Neither on import nor at run time (the out-dir check locates source folders unimported)."""
    code = ("import sys, pathlib, mpts.reports.export, mpts.reports.measures; "
            f"mpts.reports.export._check_out_dir(pathlib.Path({str(tmp_path)!r})); "
            "bad = [m for m in sys.modules if m.startswith('mpts.training')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_best_value_per_column_is_marked_by_direction(report):
    out, summary = report
    groups = summary["groups"]
    best = summary["best"]["headline"]

    def mean(g, key):
        return g["estimates"][key]["mean"]

    assert best["brier"] == [min(groups, key=lambda g: mean(g, "brier"))["group"]]
    assert best["log_predictive_density"] == [max(groups, key=lambda g: mean(g, "log_predictive_density"))["group"]]
    assert best["final_eval_accuracy"] == [max(groups, key=lambda g: mean(g, "final_eval_accuracy"))["group"]]
    closest = min(groups, key=lambda g: abs(mean(g, "coverage90") - 0.9))["group"]
    assert summary["best"]["calibration"]["coverage90"] == [closest]

    # the HTML headline table marks exactly those cells, in the winners' rows
    page = (out / "report.html").read_text()
    headline = page.split('id="table-headline"')[1].split("</table>")[0]
    marked = 0
    for row in re.findall(r"<tr>(.*?)</tr>", headline, flags=re.S)[1:]:
        cells = re.findall(r'<td class="([^"]*)"><span class="value">(.*?)</span>', row)
        group = f"{html.unescape(cells[0][1])} · {html.unescape(cells[1][1])}"
        expected = sum(group in winners for winners in best.values())
        assert sum("best" in cls for cls, _ in cells) == expected, group
        marked += expected
    assert marked >= 5


def test_best_mark_ranks_seeds_reaching_the_target_first_and_skips_reference_arms():
    from mpts.reports.measures import RUN_NUMBERS
    from mpts.reports.stats import Estimate, mean_interval
    from mpts.reports.tables import best_groups, headline_columns

    def group(name, rollouts, brier, reference=False):
        estimates = {key: Estimate(None, None, None, 0, len(rollouts)) for key in RUN_NUMBERS}
        estimates["rollouts_to_target"] = mean_interval(rollouts)
        estimates["brier"] = mean_interval([brier] * len(rollouts))
        return {"group": name, "estimates": estimates, "rollouts_ratio": {}, "reference": reference}

    groups = [group("fast but censored", [1000.0, math.nan], 0.05), group("slower, always", [3000.0, 3500.0], 0.04),
              group("oracle", [500.0, 600.0], 0.01, reference=True)]
    columns = {c.key: c for c in headline_columns(groups)}
    assert best_groups(groups, columns["rollouts_to_target"]) == ["slower, always"]
    assert best_groups(groups, columns["brier"]) == ["slower, always"]


def test_calibration_over_time_is_the_seed_mean_of_windowed_scores(ablation, report):
    _, summary = report
    assert summary["window_steps"] == 6
    group = next(g for g in summary["groups"] if g["group"] == "beta · uniform")
    frames = [scores_by_window(pd.read_parquet(d / "trace.parquet"), 6) for d in _run_dirs(ablation)
              if d.name.startswith("beta__uniform__")]
    expected = pd.concat(frames).groupby("window_start")["brier"].mean()
    got = {w["window_start"]: w["brier"] for w in group["calibration_over_time"]}
    assert len(got) == math.ceil(STEPS / 6)
    for start, value in expected.items():
        assert got[start] == pytest.approx(value)


def test_posterior_netcdf_holds_the_saved_draws(ablation, report):
    import arviz as az

    out, _ = report
    data = az.from_netcdf(out / "posterior_id_vae__thompson_target.nc")
    draws = pd.read_parquet(ablation / "runs" / "id_vae__thompson_target__seed1" / "posterior_draws.parquet")
    first = int(draws["prompt_id"].min())
    label = f"s1/p{first}"
    p = data.posterior["p"]
    assert p.sizes["chain"] == 1 and p.sizes["prompt"] == 2 * draws["prompt_id"].nunique()
    saved = draws[draws["prompt_id"] == first].sort_values("draw")
    np.testing.assert_allclose(p.sel(chain=0, prompt=label).to_numpy(), saved["p"].to_numpy())
    assert float(data.constant_data["true_p"].sel(prompt=label)) == pytest.approx(saved["true_p"].iloc[0])
    assert int(p.coords["seed"].sel(prompt=label)) == 1 and int(p.coords["prompt_id"].sel(prompt=label)) == first
    table = pd.read_csv(out / "posterior_id_vae__thompson_target_summary.csv", index_col=0)
    assert {"mean", "sd", "hdi_5%", "hdi_95%", "true_p"} <= set(table.columns)
    assert table.loc[f"p[{label}]", "mean"] == pytest.approx(saved["p"].mean(), abs=1e-3)
    assert "hdi_5%" in (out / "report.md").read_text()


# -- single runs, other baselines, disagreement with summary.json ------------------------------

def test_one_finished_run_with_target_override_tampered_summary_and_a_crashed_run(tmp_path):
    run_dir = write_run(tmp_path / "abl" / "runs" / "one", predictor="beta", acquisition="thompson_target", seed=3,
                        steps=10)
    recorded = json.loads((run_dir / "summary.json").read_text())
    recorded["final_eval_accuracy"] = 0.123
    (run_dir / "summary.json").write_text(json.dumps(recorded))
    crashed = tmp_path / "abl" / "runs" / "crashed"
    crashed.mkdir()
    (crashed / "config.yaml").write_text((run_dir / "config.yaml").read_text())

    summary = export_report([tmp_path / "abl"], tmp_path / "out", target_accuracy=0.99)
    group = summary["groups"][0]
    assert summary["target_accuracy"] == 0.99 and summary["runs"][0]["target_accuracy"] == 0.99
    assert group["estimates"]["rollouts_to_target"] == {"mean": None, "lo": None, "hi": None, "n": 0, "total": 1}
    assert group["reached_target"] == 0 and group["rollouts_ratio"] == {}
    assert group["has_elbo"] is False and "figures/elbo.png" not in summary["files"]["figures"]
    assert summary["best"]["headline"]["brier"] == []  # nothing to compare against
    assert len(summary["runs"]) == 1 and len(summary["warnings"]) == 2
    assert "final_eval_accuracy" in summary["warnings"][0]  # the loop's own numbers are checked
    assert "crashed" in summary["warnings"][1] and "not a finished run" in summary["warnings"][1]
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "not reached" in markdown and "Warnings" in markdown and "÷ uniform" not in markdown
    assert "figures/reliability.png" in markdown and (tmp_path / "out" / "report.html").is_file()


# -- bad input -----------------------------------------------------------------------------------

def test_bad_input_is_refused_with_a_clear_error(tmp_path, ablation):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        export_report([tmp_path / "missing"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a run folder"):
        export_report([tmp_path / "empty"], tmp_path / "out")
    with pytest.raises(ValueError, match="run_dirs is empty"):
        export_report([], tmp_path / "out")
    with pytest.raises(ValueError, match="target_accuracy"):
        export_report([ablation], tmp_path / "out", target_accuracy=1.5)
    with pytest.raises(ValueError, match="window_steps"):
        export_report([ablation], tmp_path / "out", window_steps=0)
    import mpts.reports

    with pytest.raises(ValueError, match="source folder"):
        export_report([ablation], Path(mpts.reports.__path__[0]) / "generated")

    broken = tmp_path / "broken"
    shutil.copytree(_run_dirs(ablation)[0], broken)
    pd.read_parquet(broken / "trace.parquet").drop(columns="pred_pit").to_parquet(broken / "trace.parquet")
    with pytest.raises(ValueError, match="pred_pit"):
        export_report([broken], tmp_path / "out")

    nameless = tmp_path / "nameless"
    shutil.copytree(_run_dirs(ablation)[0], nameless)
    (nameless / "config.yaml").write_text("seed: 0\ntarget_accuracy: 0.6\nacquisition: {name: uniform}\n")
    with pytest.raises(ValueError, match="predictor.name"):
        export_report([nameless], tmp_path / "out")

    twin = tmp_path / "twin"
    shutil.copytree(_run_dirs(ablation)[0], twin)
    with pytest.raises(ValueError, match="pass each run once"):
        export_report([_run_dirs(ablation)[0], twin], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written for refused input


# -- the browser ---------------------------------------------------------------------------------

PROBE = """<script>
window.__errors = [];
window.addEventListener("error", e => window.__errors.push(String(e.message || e.type)), true);
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const decoded = images.filter(i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0).length;
  document.title = "PROBE images=" + decoded + "/" + images.length + " errors=" + window.__errors.length
    + " tables=" + document.querySelectorAll("table").length;
});
</script>"""


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def test_html_loads_in_headless_chromium_with_every_image_decoded(report, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("headless Chromium not installed (Debian: apt-get install -y chromium)")
    out, summary = report
    page = (out / "report.html").read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("<head>", "<head>" + PROBE, 1))
    result = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
         probe.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    title = re.search(r"<title>(PROBE[^<]*)</title>", result.stdout)
    assert title, "the page's load handler did not run:\n" + result.stdout[:500]
    figures = len(summary["files"]["figures"])
    tables = page.count("<table")
    assert title.group(1) == f"PROBE images={figures}/{figures} errors=0 tables={tables}"


def test_hidden_folders_of_an_ablation_are_neither_runs_nor_skipped_runs(ablation, tmp_path):
    """runs/.warmup-cache (the LM environment's shared warm-up) sits beside the runs: not a run, no warning."""
    from mpts.reports.runs import expand_run_dirs

    copy = tmp_path / "ablation"
    shutil.copytree(ablation, copy)
    (copy / "runs" / ".warmup-cache" / "abc").mkdir(parents=True)
    (copy / "runs" / "beta__uniform__seed9").mkdir()  # a run still going: skipped, and said so
    found, skipped = expand_run_dirs([copy])
    assert len(found) == len(list((ablation / "runs").iterdir()))
    assert [p.name for p in skipped] == ["beta__uniform__seed9"]


def test_the_report_states_the_resolution_of_rollouts_to_target(report):
    """Rollouts to target is read at the first evaluation at or above the target, so the report says
    how many rollouts lie between evaluations: 16 prompts x k 8 x every 2 steps for the selecting
    arms, twice that for dynamic sampling, which rolls out 32 prompts a step."""
    out, _ = report
    text = (out / "report.md").read_text()
    assert "- rollouts between evaluations (the resolution of rollouts to target): **256–512 (median per run)**" in text
