"""`export_report`: run folders in, report.html + report.md + figures/ + summary.json out.

Runs are grouped by predictor x acquisition rule and seeds pooled (means with 95% t-intervals over
seeds; comparisons with the baseline arms paired by seed, see `stats`). Everything shown is recomputed from the runs' parquet files; the summary.json
written here holds every number the report shows, so scripts can read what people look at.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from mpts.inference.scoring import scores_by_window, seconds_columns
from mpts.reports.output_paths import check_report_folder, mark_report_folder

from . import plots
from .levels import level_shares, pooled_shares, read_levels, thirds
from .measures import json_ready, pool_groups, recorded_mismatches, reference_role, run_numbers
from .posterior import group_inference_data, posterior_summary, write_netcdf
from .render import Document, FigureBlock, Section, TextBlock, render_html, render_markdown
from .runs import RUN_FILES, Run, group_slug, load_runs
from .stats import LEVEL, METHOD
from .tables import (CALIBRATION_COLUMNS, LEARNING_COLUMNS, comparison_table, frame_table, headline_columns,
                     paired_table, runs_table, timing_table)

FIGURES = "figures"
POSTERIOR_ROWS_SHOWN = 6
SOURCE_PACKAGES = ("mpts.models", "mpts.inference", "mpts.training", "mpts.reports")


def _check_out_dir(out_dir: Path) -> None:
    """Reports are outputs: refuse to write them into the package's own source folders."""
    target = out_dir.resolve()
    for name in SOURCE_PACKAGES:
        # find_spec locates a package without importing it (mpts.reports never imports mpts.training)
        for folder in importlib.util.find_spec(name).submodule_search_locations:
            package = Path(folder).resolve()
            if package.is_dir() and (target == package or package in target.parents):
                raise ValueError(f"out_dir {out_dir} lies inside the source folder of {name} ({package}); "
                                 f"write reports next to the runs instead")


def _check_options(target_accuracy: float | None, window_steps: int | None) -> None:
    if target_accuracy is not None and not (0.0 < float(target_accuracy) <= 1.0):
        raise ValueError(f"target_accuracy must be in (0, 1], got {target_accuracy}")
    if window_steps is not None and (isinstance(window_steps, bool) or int(window_steps) != window_steps
                                     or window_steps < 1):
        raise ValueError(f"window_steps must be a positive integer, got {window_steps!r}")


def _run_row(run: Run, target: float) -> dict[str, Any]:
    numbers = run_numbers(run, target)
    return {
        "run": run.name, "path": str(run.path), "group": run.group, "predictor": run.predictor,
        "acquisition": run.acquisition, "predictor_label": run.predictor_label,
        "acquisition_label": run.acquisition_label, "point": run.point, "seed": run.seed, "target_accuracy": target,
        "reference": reference_role(run),
        **numbers, "has_elbo": run.has_elbo, "has_draws": run.draws is not None,
        "has_recorded_summary": run.recorded_summary is not None,
        "summary_json_mismatches": recorded_mismatches(run, numbers, target),
    }


@dataclasses.dataclass
class _Report:
    """What every section builder needs: the runs by group, pooled numbers, colours, where to save."""

    out_dir: Path
    runs: list[Run]
    run_rows: list[dict[str, Any]]
    groups: list[dict[str, Any]]
    by_group: dict[str, list[Run]]
    window: int
    colors: dict[str, tuple] = dataclasses.field(default_factory=dict)
    figures: list[FigureBlock] = dataclasses.field(default_factory=list)
    netcdf: dict[str, str] = dataclasses.field(default_factory=dict)
    windows: dict[str, pd.DataFrame] = dataclasses.field(default_factory=dict)
    level_shares: dict[str, pd.DataFrame] = dataclasses.field(default_factory=dict)

    def figure(self, figure, name: str, caption: str) -> FigureBlock:
        figure.savefig(self.out_dir / FIGURES / name, format="png")
        block = FigureBlock(name, caption)
        self.figures.append(block)
        return block

    @property
    def estimates(self) -> dict[str, dict[str, Any]]:
        return {g["group"]: g["estimates"] for g in self.groups}

    @property
    def traces(self) -> dict[str, pd.DataFrame]:
        return {g: pd.concat([r.trace for r in rs], ignore_index=True) for g, rs in self.by_group.items()}

    @property
    def metrics(self) -> dict[str, list[pd.DataFrame]]:
        return {g: [r.metrics for r in rs] for g, rs in self.by_group.items()}

    @property
    def targets(self) -> list[float]:
        return sorted({r["target_accuracy"] for r in self.run_rows})


def _headline(report: _Report) -> tuple[Section, dict[str, list[str]]]:
    groups = report.groups
    baselines = sorted({rule for g in groups for rule in g["rollouts_ratio"]})
    table, best = comparison_table(
        "headline", groups, headline_columns(groups),
        "Mean over seeds with 95% t-interval; ★ marks the best value per column. "
        "Rollouts to target average the seeds that reached the target (count shown when not all did; "
        "more seeds reaching it ranks first). "
        + (f"Rollouts ÷ {' / ÷ '.join(r.replace('_', ' ') for r in baselines)}: geometric mean over seeds of the "
           "ratio to that rule's run with the same seed (and the same predictor where that arm exists; below 1: "
           "fewer rollouts). " if baselines else "")
        + "Calibration scores are of the predictions made before each outcome."
        + (" Reference arms (the rule sees the true success rates) are never marked best."
           if any(g["reference"] for g in groups) else ""))
    blocks = [table]
    if baselines:
        blocks.append(paired_table(groups, baselines))
    return Section("headline", "Headline comparison", blocks), best


def _calibration(report: _Report) -> tuple[Section, dict[str, list[str]]]:
    table, best = comparison_table(
        "calibration", report.groups, CALIBRATION_COLUMNS,
        "Scores of the predictive distribution made before each outcome (failed rollouts left out); log "
        "predictive density in nats per prediction. PIT in 50% / 90%: share of randomised PIT values inside the "
        "central 50% / 90% of [0, 1]; true p in 50% / 90%: share of true rates (simulator only) inside the "
        "predicted central interval of p; best = closest to the nominal level.")
    traces, colors = report.traces, report.colors
    return Section("calibration", "Calibration of the predictions", [
        TextBlock("Every rolled-out prompt was predicted before its k rollouts ran, so each run is a "
                  "prequential calibration experiment. Seeds are pooled in the figures."),
        table,
        report.figure(plots.reliability(traces, colors), "reliability.png",
                      "Reliability diagram: mean predicted success rate vs observed rate s/k in 10 equal-mass bins "
                      "of the prediction (bars below: predictions per bin; horizontal line: range of predictions "
                      "in the bin)."),
        report.figure(plots.pit_histograms(traces, colors), "pit.png",
                      "Randomised PIT histogram of each observed success count under its predictive distribution "
                      "(flat at 1 when calibrated; U-shaped: overconfident; hump: underconfident)."),
        report.figure(plots.coverage(report.estimates, colors), "coverage.png",
                      "Interval coverage at 50% and 90%: from the PIT of observed counts, and of the true success "
                      "rate by the predicted central interval of p (simulator only)."),
        report.figure(plots.confusion(traces), "state_confusion.png",
                      "DPS-style state confusion: observed state of each group of k rollouts (unsolved s=0, partial "
                      "0<s<k, solved s=k) against the state the predictor found most probable; colour is the row "
                      "share."),
    ]), best


def _over_time(report: _Report) -> Section:
    report.windows = {g: pd.concat([scores_by_window(r.trace, report.window).assign(seed=r.seed) for r in rs],
                                   ignore_index=True) for g, rs in report.by_group.items()}
    return Section("over-time", "Calibration over time", [
        report.figure(plots.calibration_over_time(report.windows, report.colors), "calibration_over_time.png",
                      f"Scores per window of {report.window} steps, averaged over seeds: a predictor that drifts, "
                      "or lags the learner, shows a trend."),
    ])


def _efficiency(report: _Report) -> Section:
    metrics, colors, targets = report.metrics, report.colors, report.targets
    recorded = {c for r in report.runs for c in seconds_columns(r.metrics)}
    seconds = [c for c in plots.PHASE_COLUMNS if c in recorded] + sorted(recorded - set(plots.PHASE_COLUMNS))
    smooth = max(1, math.ceil(max(len(r.metrics) for r in report.runs) / 20))
    to_target = {g: e["rollouts_to_target"] for g, e in report.estimates.items()}
    return Section("efficiency", "Sampling efficiency", [
        report.figure(plots.rollouts_to_target(to_target, colors), "rollouts_to_target.png",
                      "Rollouts (generated completions) spent until eval accuracy first reached the target accuracy "
                      f"({', '.join(f'{t:g}' for t in targets)})."),
        report.figure(plots.accuracy_curves(metrics, colors, targets), "accuracy_curves.png",
                      "Eval accuracy against cumulative rollouts and against wall-clock time; thin lines are seeds, "
                      "bold lines their mean over the range all seeds cover."),
        report.figure(plots.effective_ratio(metrics, colors, smooth), "effective_ratio.png",
                      "Effective ratio: share of the prompts rolled out in a step whose k rollouts were neither all "
                      "wrong nor all right, i.e. carried a GRPO learning signal."),
        report.figure(plots.time_per_step({g["group"]: g["time_per_step"] for g in report.groups},
                                          {g["group"]: g["estimates"]["seconds_per_step"].mean for g in report.groups}),
                      "time_per_step.png",
                      "Mean wall-clock time per step, split into the phases of the loop; grey: the rest of the step "
                      "(trace rows, checkpoints, bookkeeping); other recorded timings beside them."),
        timing_table(report.groups, seconds),
    ])


def _learning(report: _Report) -> Section | None:
    """Both held-out accuracies, trained vs held-out, and where each rule spent its updates."""
    columns = [c for c in LEARNING_COLUMNS
               if any(g["estimates"][c.key].mean is not None for g in report.groups)]
    if not columns:
        return None
    table, _ = comparison_table(
        "learning", report.groups, columns,
        "Mean over seeds with 95% Student-t interval. Gain: mean of the last three evaluations minus the "
        "evaluation before the first step. Recently trained prompts: those trained since the previous "
        "evaluation, scored as the held-out set is (greedy for the LM). Overlap: share of a step's batch "
        "already trained in the previous 20 steps (mean over steps). Top 10%: share of all updates on the "
        "most-trained tenth of the pool at the end. Solved greedily: share of the rolled-out batch that "
        "greedy decoding already answered correctly before the update (LM only).")
    return Section("learning", "Learning and selection diagnostics", [
        table,
        report.figure(plots.learning_curves(report.metrics, report.colors), "learning_curves.png",
                      "Held-out greedy (solid) and sampled (dashed) accuracy and accuracy on recently trained "
                      "prompts (dotted) at each evaluation, averaged over seeds."),
    ])


def _selection_by_level(report: _Report) -> Section | None:
    """Which levels each arm spent its rollouts on, over time (runs whose folder records the levels)."""
    for group, runs in report.by_group.items():
        per_seed = [level_shares(r.trace, levels, report.window) for r in runs
                    if (levels := read_levels(r.path)) is not None]
        if per_seed:
            report.level_shares[group] = pooled_shares(per_seed)
    if not report.level_shares:
        return None
    levels = sorted({int(c) for frame in report.level_shares.values() for c in frame.columns})
    table = pd.DataFrame({f"level {level}": {group: "{:.2f} → {:.2f}".format(*thirds(frame)[level])
                                             if level in frame.columns else "—"
                                             for group, frame in report.level_shares.items()}
                          for level in levels})
    return Section("levels", "Selection by difficulty level", [
        frame_table("levels", table, "Share of the prompts rolled out at each level (the pool's difficulty levels, "
                    "its clusters), mean over seeds: first third of the run → last third.", "group"),
        report.figure(plots.selection_by_level(report.level_shares, report.window), "selection_by_level.png",
                      f"Share of the prompts rolled out at each level per window of {report.window} steps, mean "
                      "over seeds: which levels each arm spent its rollouts on, over time."),
    ])


def _posterior(report: _Report) -> Section | None:
    """ELBO trace of SVI-fitted predictors; ArviZ export of every group that saved posterior draws."""
    blocks: list = []
    metrics = report.metrics
    elbo = {g: metrics[g] for g, rs in report.by_group.items() if any(r.has_elbo for r in rs)}
    if elbo:
        blocks.append(report.figure(plots.elbo_trace(elbo, report.colors), "elbo.png",
                                    "Negative ELBO (loss) of each step's streaming-SVI update, for predictors "
                                    "fitted by SVI."))
    for group, runs in report.by_group.items():
        data = group_inference_data(runs)
        if data is None:
            continue
        slug = group_slug(group)
        write_netcdf(data, report.out_dir / f"posterior_{slug}.nc")
        report.netcdf[group] = f"posterior_{slug}.nc"
        table = posterior_summary(data)
        table.to_csv(report.out_dir / f"posterior_{slug}_summary.csv")
        shown = table.head(POSTERIOR_ROWS_SHOWN)
        blocks.append(TextBlock(
            f"{group}: final posterior of p for {data.posterior.sizes['prompt']} sampled prompts "
            f"({data.posterior.sizes['draw']} draws, one chain) saved as ArviZ InferenceData in posterior_{slug}.nc; "
            f"ArviZ's summary of the first {len(shown)} (all in posterior_{slug}_summary.csv):"))
        blocks.append(frame_table(f"posterior-{slug}", shown, "Labels such as s0/p12: seed 0, prompt 12; HDI at 90%; "
                                  "true_p: the simulator's true rate.", "prompt"))
    return Section("posterior", "SVI fit and posterior export", blocks) if blocks else None


def evaluation_gaps(runs: list[Run]) -> list[float]:
    """Per run, the median number of rollouts between consecutive evaluations: rollouts to target
    is read at the first evaluation at or above the target, so this is its resolution."""
    gaps = []
    for run in runs:
        evaluated = run.metrics.loc[run.metrics["eval_accuracy"].notna(), "cumulative_rollouts"]
        between = evaluated.diff().dropna()
        if len(between):
            gaps.append(float(between.median()))
    return gaps


def _resolution(runs: list[Run]) -> str:
    gaps = evaluation_gaps(runs)
    if not gaps:
        return "n/a (fewer than two evaluations per run)"
    low, high = min(gaps), max(gaps)
    return f"{low:,.0f}" if low == high else f"{low:,.0f}–{high:,.0f} (median per run)"


def _document(report: _Report, sections: list[Section], warnings: list[str]) -> Document:
    runs, groups = report.runs, report.groups
    lengths = [len(r.metrics) for r in runs]
    return Document(
        title=f"mpts report: {len(runs)} run{'s' * (len(runs) != 1)} in {len(groups)} "
              f"group{'s' * (len(groups) != 1)}",
        facts=[("groups (predictor · rule)", str(len(groups))),
               ("seeds per group", ", ".join(sorted({str(len(g['seeds'])) for g in groups}))),
               ("target accuracy", ", ".join(f"{t:g}" for t in report.targets)),
               ("steps", f"{min(lengths)}–{max(lengths)}" if min(lengths) != max(lengths) else str(max(lengths))),
               ("rollouts between evaluations (the resolution of rollouts to target)", _resolution(runs)),
               ("calibration window", f"{report.window} steps"),
               ("predictions scored", f"{sum(int(r['rows']) for r in report.run_rows):,}")],
        sections=sections, warnings=warnings)


def _level_json(shares: pd.DataFrame | None) -> dict[str, Any]:
    """Per window start, the share of rolled-out prompts at each level (keys: the levels)."""
    if shares is None:
        return {}
    return {"selection_by_level": [{"window_start": int(start), **{str(level): float(v) for level, v in row.items()}}
                                   for start, row in shares.iterrows()]}


def export_report(run_dirs: Sequence[Path], out_dir: Path, *, target_accuracy: float | None = None,
                  window_steps: int | None = None) -> dict:
    """Write the report of `run_dirs` (run folders or ablation folders) into `out_dir`.

    `target_accuracy` overrides each run's configured target for "rollouts to target";
    `window_steps` sets the window of the calibration-over-time scores (default: a tenth of the
    longest run). Returns the summary also written to `out_dir/summary.json`.
    """
    _check_options(target_accuracy, window_steps)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    check_report_folder(out_dir, [Path(p) for p in run_dirs])  # never into a run or over someone's files
    runs, skipped = load_runs(run_dirs)
    (out_dir / FIGURES).mkdir(parents=True, exist_ok=True)
    mark_report_folder(out_dir)

    longest = max(len(r.metrics) for r in runs)
    window = int(window_steps) if window_steps is not None else max(1, math.ceil(longest / 10))
    run_rows = [_run_row(r, target_accuracy if target_accuracy is not None else r.target_accuracy) for r in runs]
    by_group: dict[str, list[Run]] = {}
    for run in runs:
        by_group.setdefault(run.group, []).append(run)
    report = _Report(out_dir, runs, run_rows, pool_groups(run_rows), by_group, window,
                     colors=plots.group_colors(list(by_group)))
    warnings = [f"{r['run']}: its summary.json differs from the recomputed values: "
                + "; ".join(r["summary_json_mismatches"]) for r in run_rows if r["summary_json_mismatches"]]
    warnings += [f"{path}: left out, not a finished run (no {', '.join(RUN_FILES)} yet)" for path in skipped]

    headline, headline_best = _headline(report)
    calibration, calibration_best = _calibration(report)
    sections = [headline, calibration, _over_time(report), _efficiency(report)]
    learning = _learning(report)
    sections += [learning] if learning else []
    by_level = _selection_by_level(report)
    sections += [by_level] if by_level else []
    posterior = _posterior(report)
    sections += [posterior] if posterior else []
    sections.append(Section("runs", "Runs", [runs_table(run_rows)]))
    document = _document(report, sections, warnings)
    (out_dir / "report.html").write_text(render_html(document, out_dir / FIGURES), encoding="utf-8")
    (out_dir / "report.md").write_text(render_markdown(document, FIGURES), encoding="utf-8")

    group_json = []
    for group in report.groups:
        per_window = report.windows[group["group"]].drop(columns="seed").groupby(["window_start", "window_end"])
        group_json.append({**group, "posterior_netcdf": report.netcdf.get(group["group"]),
                           "calibration_over_time": per_window.mean().reset_index().to_dict(orient="records"),
                           **_level_json(report.level_shares.get(group["group"]))})
    summary = json_ready({
        "target_accuracy": target_accuracy, "window_steps": window,
        "intervals": {"level": LEVEL, "method": METHOD},
        "runs": run_rows, "groups": group_json,
        "best": {"headline": headline_best, "calibration": calibration_best},
        "files": {"html": "report.html", "markdown": "report.md",
                  "figures": [f"{FIGURES}/{b.name}" for b in report.figures],
                  "netcdf": sorted(report.netcdf.values())},
        "warnings": warnings,
    })
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False), encoding="utf-8")
    return summary
