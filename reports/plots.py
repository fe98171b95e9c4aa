"""The report's figures, one function per figure, drawn with matplotlib's Agg renderer.

Functions take plain data (per-group lists of frames or pooled numbers) and return a Figure;
the exporter saves it. Figures are built with `matplotlib.figure.Figure` directly rather than
pyplot: saving one to PNG uses the Agg renderer, no GUI backend or global figure state is
involved, and importing this module leaves the caller's backend (a notebook's, say) alone.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from mpts.inference.scoring import STATE_NAMES, reliability_table, state_confusion
from mpts.models.extras import import_extra

matplotlib = import_extra("matplotlib", "reports")
from matplotlib import colormaps  # noqa: E402 (after the extra check)
from matplotlib.figure import Figure  # noqa: E402

from .stats import Estimate
from .tables import time_unit

STYLE = {
    "font.size": 10, "axes.titlesize": 10.5, "axes.labelsize": 10, "legend.fontsize": 9,
    "xtick.labelsize": 9, "ytick.labelsize": 9, "axes.grid": True, "grid.alpha": 0.3,
    "axes.spines.top": False, "axes.spines.right": False, "figure.dpi": 110, "savefig.dpi": 110,
}
PANEL_COLUMNS = 4


def group_colors(groups: Sequence[str]) -> dict[str, tuple]:
    cmap = colormaps["tab10" if len(groups) <= 10 else "tab20"]
    return {g: cmap(i % cmap.N) for i, g in enumerate(groups)}


def styled(draw):
    """Run a figure function under STYLE (rcParams are read when artists are created)."""
    @functools.wraps(draw)
    def wrapper(*args, **kwargs) -> Figure:
        with matplotlib.rc_context(STYLE):
            return draw(*args, **kwargs)
    return wrapper


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def _panels(count: int, panel_w: float = 3.3, panel_h: float = 3.0, sharex=True, sharey=True):
    columns = min(PANEL_COLUMNS, count)
    rows = math.ceil(count / columns)
    fig = _figure(panel_w * columns, panel_h * rows)
    axes = fig.subplots(rows, columns, sharex=sharex, sharey=sharey, squeeze=False).ravel()
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, axes[:count]


def usable(trace: pd.DataFrame) -> pd.DataFrame:
    return trace.loc[~trace["failed"].fillna(False).astype(bool).to_numpy()]


# -- calibration ------------------------------------------------------------------------------

@styled
def reliability(traces: Mapping[str, pd.DataFrame], colors: Mapping[str, tuple], bins: int = 10) -> Figure:
    """Predicted success rate vs observed frequency in equal-mass bins; rows per bin in a strip below."""
    count = len(traces)
    columns = min(PANEL_COLUMNS, count)
    lines = math.ceil(count / columns)
    fig = _figure(3.1 * columns, 4.1 * lines)
    grid = fig.add_gridspec(2 * lines, columns, height_ratios=[3.4, 1] * lines)
    for i, (group, trace) in enumerate(traces.items()):
        line, column = divmod(i, columns)
        top, strip = fig.add_subplot(grid[2 * line, column]), fig.add_subplot(grid[2 * line + 1, column])
        rows = usable(trace)
        table = reliability_table(rows["pred_mean"], rows["successes"], rows["trials"], bins=bins)
        top.plot([0, 1], [0, 1], color="0.5", lw=1, ls="--")
        top.hlines(table["observed_rate"], table["lo"], table["hi"], color=colors[group], lw=1, alpha=0.5)
        top.plot(table["pred_mean"], table["observed_rate"], "o-", color=colors[group], ms=4)
        for number, row in enumerate(table.itertuples(), start=1):
            top.annotate(str(number), (row.pred_mean, row.observed_rate), textcoords="offset points",
                         xytext=(-6, 5), ha="center", fontsize=7, color="0.35")
        top.set_title(f"{group}\n{len(rows):,} predictions")
        top.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted success rate E[p]")
        top.set_ylabel("observed rate s/k" if i % columns == 0 else "")
        bars = strip.bar(table["bin"] + 1, table["count"], color=colors[group], alpha=0.6, width=0.8)
        strip.bar_label(bars, labels=[f"{c:,}" for c in table["count"]], fontsize=7, padding=1)
        strip.set_ylim(0, table["count"].max() * 1.35 if len(table) else 1)
        strip.set_xticks(table["bin"] + 1)
        strip.tick_params(axis="x", labelsize=7)
        strip.set_yticks([])
        strip.grid(False)
        strip.set_xlabel("bin (equal mass): predictions per bin", fontsize=8)
    return fig


@styled
def pit_histograms(traces: Mapping[str, pd.DataFrame], colors: Mapping[str, tuple], bins: int = 10) -> Figure:
    """Randomised PIT of each observed count; flat at 1 when the predictive is calibrated."""
    fig, axes = _panels(len(traces), panel_h=2.6)
    edges = np.linspace(0, 1, bins + 1)
    for ax, (group, trace) in zip(axes, traces.items()):
        pit = usable(trace)["pred_pit"].to_numpy(np.float64, na_value=np.nan)
        pit = pit[np.isfinite(pit)]
        ax.hist(pit, bins=edges, density=True, color=colors[group], alpha=0.75, edgecolor="white")
        ax.axhline(1.0, color="0.3", ls="--", lw=1)
        ax.set_title(f"{group}\n{pit.size:,} outcomes")
        ax.set_xlim(0, 1)
        ax.set_xlabel("PIT value")
    for ax in axes[:: PANEL_COLUMNS]:
        ax.set_ylabel("density (uniform = 1)")
    return fig


@styled
def coverage(estimates: Mapping[str, Mapping[str, Estimate]], colors: Mapping[str, tuple]) -> Figure:
    """Share of outcomes (PIT) and of true rates (simulator) inside the 50% and 90% intervals."""
    kinds = [("coverage50", "50% (PIT)"), ("coverage90", "90% (PIT)"),
             ("coverage50_true", "50% (true p)"), ("coverage90_true", "90% (true p)")]
    kinds = [(k, label) for k, label in kinds if any(e[k].mean is not None for e in estimates.values())]
    groups = list(estimates)
    fig = _figure(max(6.0, 1.0 + 1.2 * len(kinds) * max(1, len(groups)) * 0.35), 3.6)
    ax = fig.subplots()
    width = 0.8 / max(1, len(groups))
    for j, group in enumerate(groups):
        xs, ys, errs = [], [], [[], []]
        for i, (key, _) in enumerate(kinds):
            estimate = estimates[group][key]
            if estimate.mean is None:
                continue
            xs.append(i - 0.4 + width * (j + 0.5))
            ys.append(estimate.mean)
            errs[0].append(estimate.mean - estimate.lo)
            errs[1].append(estimate.hi - estimate.mean)
        ax.bar(xs, ys, width=width * 0.92, color=colors[group], yerr=errs, capsize=2, label=group)
    for i, (key, _) in enumerate(kinds):
        nominal = 0.5 if key.startswith("coverage50") else 0.9
        ax.hlines(nominal, i - 0.45, i + 0.45, color="black", lw=1.5, ls="--")
    ax.set_xticks(range(len(kinds)), [label for _, label in kinds])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share inside the interval")
    ax.set_title("Interval coverage (dashed: nominal level; bars: mean over seeds, 95% t-interval)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return fig


@styled
def confusion(traces: Mapping[str, pd.DataFrame]) -> Figure:
    """DPS-style states: observed (rows) vs most probable predicted (columns), row-normalised colour."""
    fig, axes = _panels(len(traces), panel_w=2.9, panel_h=3.0)
    for ax, (group, trace) in zip(axes, traces.items()):
        rows = usable(trace)
        counts = state_confusion(rows["pred_p_unsolved"], rows["pred_p_informative"], rows["pred_p_solved"],
                                 rows["successes"], rows["trials"]).to_numpy()
        share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for (i, j), n in np.ndenumerate(counts):
            ax.text(j, i, f"{n:,}\n{share[i, j]:.0%}", ha="center", va="center", fontsize=8,
                    color="white" if share[i, j] > 0.6 else "black")
        ax.set_xticks(range(3), STATE_NAMES)
        ax.set_yticks(range(3), STATE_NAMES)
        ax.grid(False)
        accuracy = np.trace(counts) / max(counts.sum(), 1)
        ax.set_title(f"{group}\nstate accuracy {accuracy:.2f}")
        ax.set_xlabel("predicted state")
    for ax in axes[:: PANEL_COLUMNS]:
        ax.set_ylabel("observed state")
    return fig


WINDOW_SCORES = (
    ("log_predictive_density", "log predictive density (nats)"), ("brier", "Brier score"),
    ("ece", "ECE"), ("spearman_empirical", "Spearman vs s/k"),
    ("auroc_informative", "AUROC of P(informative)"), ("coverage90", "90% PIT coverage"),
)


@styled
def calibration_over_time(windows: Mapping[str, pd.DataFrame], colors: Mapping[str, tuple]) -> Figure:
    """Scores per window of steps, averaged over seeds (a drifting predictor shows a trend)."""
    fig = _figure(12.0, 6.0)
    axes = fig.subplots(2, 3, sharex=True).ravel()
    for ax, (key, label) in zip(axes, WINDOW_SCORES):
        for group, frame in windows.items():
            mean = frame.groupby("window_start")[[key, "window_end"]].mean()
            middle = (mean.index.to_numpy() + mean["window_end"].to_numpy()) / 2
            ax.plot(middle, mean[key], "o-", ms=3, color=colors[group], label=group)
        ax.set_title(label)
        if key == "coverage90":
            ax.axhline(0.9, color="0.3", ls="--", lw=1)
    for ax in axes[3:]:
        ax.set_xlabel("training step (window midpoint)")
    axes[2].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return fig


# -- sampling efficiency ----------------------------------------------------------------------

@styled
def effective_ratio(metrics: Mapping[str, Sequence[pd.DataFrame]], colors: Mapping[str, tuple],
                    smooth: int) -> Figure:
    """Share of rolled-out groups with 0 < s < k, per step (seed mean, rolling mean over `smooth` steps)."""
    fig = _figure(9.0, 3.8)
    ax = fig.subplots()
    for group, frames in metrics.items():
        table = pd.concat([f.set_index("step")["effective_ratio"] for f in frames], axis=1).sort_index()
        rolled = table.rolling(smooth, min_periods=1, center=True).mean()
        ax.plot(rolled.index, rolled.mean(axis=1), color=colors[group], lw=1.8, label=group)
        if table.shape[1] > 1:
            ax.fill_between(rolled.index, rolled.min(axis=1), rolled.max(axis=1), color=colors[group], alpha=0.15)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("training step")
    ax.set_ylabel("effective ratio (share of groups with 0<s<k)")
    smoothing = f"rolling mean over {smooth} steps; " if smooth > 1 else ""
    ax.set_title(f"Effective ratio per step ({smoothing}line: seed mean; band: range over seeds)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return fig


def _mean_curve(frames: Sequence[pd.DataFrame], x: str) -> tuple[np.ndarray, np.ndarray]:
    """Seed-mean of eval accuracy, each seed interpolated onto a grid over the common x range."""
    curves = [f[[x, "eval_accuracy"]].dropna().sort_values(x) for f in frames]
    curves = [c for c in curves if len(c)]
    if not curves:
        return np.empty(0), np.empty(0)
    top = min(c[x].iloc[-1] for c in curves)
    bottom = max(c[x].iloc[0] for c in curves)
    grid = np.linspace(bottom, top, 100) if top > bottom else np.array([top])
    values = np.stack([np.interp(grid, c[x].to_numpy(float), c["eval_accuracy"].to_numpy(float)) for c in curves])
    return grid, values.mean(axis=0)


LEARNING_CURVES = (("eval_accuracy_greedy", "held-out greedy", "-"), ("eval_accuracy_sampled", "held-out sampled", "--"),
                   ("trained_accuracy", "recently trained prompts", ":"))


@styled
def learning_curves(metrics: Mapping[str, Sequence[pd.DataFrame]], colors: Mapping[str, tuple]) -> Figure:
    """Per group: held-out greedy and sampled accuracy and accuracy on recently trained prompts
    against the step, averaged over seeds at each evaluation step."""
    fig = _figure(12.0, 4.0)
    ax = fig.subplots(1, 1)
    for group, frames in metrics.items():
        for column, label, style in LEARNING_CURVES:
            parts = [f[["step", column]].dropna() for f in frames if column in f]
            if not parts or all(p.empty for p in parts):
                continue
            mean = pd.concat(parts).groupby("step")[column].mean()
            ax.plot(mean.index, mean.to_numpy(), color=colors[group], ls=style, lw=1.6, label=f"{group}: {label}")
    ax.set_xlabel("training step")
    ax.set_ylabel("accuracy")
    ax.set_title("Held-out (greedy, sampled) vs recently trained prompts (seed mean)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=7)
    return fig


@styled
def accuracy_curves(metrics: Mapping[str, Sequence[pd.DataFrame]], colors: Mapping[str, tuple],
                    targets: Sequence[float]) -> Figure:
    """Eval accuracy against cumulative rollouts and against wall time (thin: seeds; bold: mean)."""
    fig = _figure(12.0, 4.0)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, x, label in ((axes[0], "cumulative_rollouts", "cumulative rollouts (generated completions)"),
                         (axes[1], "wall_seconds", "wall time (s)")):
        for group, frames in metrics.items():
            for frame in frames:
                points = frame[[x, "eval_accuracy"]].dropna()
                ax.plot(points[x], points["eval_accuracy"], color=colors[group], lw=0.7, alpha=0.35)
            grid, mean = _mean_curve(frames, x)
            ax.plot(grid, mean, color=colors[group], lw=2, label=group)
        for target in sorted(set(targets)):
            ax.axhline(target, color="0.2", ls=":", lw=1.2)
        ax.set_xlabel(label)
    axes[0].set_ylabel("eval accuracy")
    axes[0].set_title("Eval accuracy vs rollouts (dotted: target)")
    axes[1].set_title("Eval accuracy vs wall time")
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return fig


@styled
def rollouts_to_target(estimates: Mapping[str, Estimate], colors: Mapping[str, tuple]) -> Figure:
    """Rollouts spent until eval accuracy first reached the target, mean over the seeds that reached it."""
    groups = list(estimates)
    fig = _figure(9.0, 0.9 + 0.42 * len(groups))
    ax = fig.subplots()
    reached = [estimates[g].mean is not None for g in groups]
    top = max([estimates[g].hi for g, r in zip(groups, reached) if r] or [1.0])
    for i, group in enumerate(groups):
        estimate = estimates[group]
        if estimate.mean is None:
            ax.text(0, i, f"  not reached (0/{estimate.total} seeds)", va="center", fontsize=9, color="0.3")
            continue
        ax.barh(i, estimate.mean, color=colors[group], height=0.65,
                xerr=[[estimate.mean - estimate.lo], [estimate.hi - estimate.mean]], capsize=3)
        ax.text(estimate.hi + top * 0.01, i, f" {estimate.mean:,.0f}  ({estimate.n}/{estimate.total} seeds)",
                va="center", fontsize=9)
    ax.set_yticks(range(len(groups)), groups)
    ax.invert_yaxis()
    ax.set_xlim(0, top * 1.35)
    ax.set_xlabel("rollouts until eval accuracy first reached the target")
    ax.set_title("Rollouts to target (mean over seeds that reached it, 95% t-interval)")
    return fig


PHASE_COLUMNS = ("predict_seconds", "select_seconds", "rollout_seconds", "observe_seconds",
                 "train_seconds", "eval_seconds")


@styled
def time_per_step(timing: Mapping[str, Mapping[str, Estimate]], wall: Mapping[str, float | None]) -> Figure:
    """Mean time per step: the loop's phases stacked, then the rest of the wall-clock step (trace
    rows, checkpoints, bookkeeping); other recorded timings beside them."""
    groups = list(timing)
    phases = [c for c in PHASE_COLUMNS if any(c in timing[g] for g in groups)]
    extras = sorted({c for g in groups for c in timing[g]} - set(phases))
    fig = _figure(12.0 if extras else 9.0, 1.2 + 0.42 * len(groups))
    axes = fig.subplots(1, 2, sharey=True, width_ratios=[2, 1]) if extras else [fig.subplots()]
    cmap = colormaps["Set2"]
    unit, scale = time_unit([e.mean for g in groups for e in timing[g].values()])
    left = np.zeros(len(groups))
    for i, column in enumerate(phases):
        values = np.array([timing[g][column].mean if column in timing[g] else 0.0 for g in groups], dtype=float)
        values = np.nan_to_num(values) * scale
        axes[0].barh(range(len(groups)), values, left=left, color=cmap(i), label=column.removesuffix("_seconds"))
        left += values
    rest = np.array([(wall[g] or 0.0) * scale for g in groups], dtype=float) - left
    axes[0].barh(range(len(groups)), np.clip(rest, 0, None), left=left, color="0.82", label="rest of step")
    axes[0].set_yticks(range(len(groups)), groups)
    axes[0].invert_yaxis()
    axes[0].set_xlabel(f"{'milliseconds' if unit == 'ms' else 'seconds'} per step (mean over steps and seeds)")
    axes[0].set_title("Time per step by phase of the loop")
    axes[0].legend(loc="upper center", bbox_to_anchor=(0.5, -0.16 - 0.4 / len(groups)), ncols=len(phases) + 1,
                   frameon=False)
    if extras:
        height = 0.8 / len(extras)
        for i, column in enumerate(extras):
            values = np.nan_to_num(np.array([timing[g][column].mean if column in timing[g] else 0.0
                                             for g in groups], dtype=float)) * scale
            axes[1].barh(np.arange(len(groups)) - 0.4 + height * (i + 0.5), values, height=height,
                         color=colormaps["Dark2"](i), label=column.removesuffix("_seconds"))
        axes[1].set_xlabel(f"{unit} per step")
        axes[1].set_title("Other recorded timings\n(may be parts of a phase)")
        axes[1].legend(loc="upper center", bbox_to_anchor=(0.5, -0.16 - 0.4 / len(groups)),
                       ncols=min(3, len(extras)), frameon=False)
    return fig


@styled
def elbo_trace(metrics: Mapping[str, Sequence[pd.DataFrame]], colors: Mapping[str, tuple]) -> Figure:
    """Mean negative ELBO of each streaming-SVI update, per step (thin: seeds; bold: seed mean)."""
    fig = _figure(9.0, 3.8)
    ax = fig.subplots()
    for group, frames in metrics.items():
        for frame in frames:
            ax.plot(frame["step"], frame["elbo"].astype(float), color=colors[group], lw=0.7, alpha=0.35)
        table = pd.concat([f.set_index("step")["elbo"].astype(float) for f in frames], axis=1).sort_index()
        ax.plot(table.index, table.mean(axis=1), color=colors[group], lw=2, label=group)
    ax.set_xlabel("training step")
    ax.set_ylabel("negative ELBO (nats, mean per update)")
    ax.set_title("Streaming SVI: ELBO loss of each step's update")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return fig


@styled
def selection_by_level(shares: Mapping[str, pd.DataFrame], window: int) -> Figure:
    """Per group: share of the rolled-out prompts at each level per window of steps (seed mean), stacked."""
    levels = sorted({int(c) for frame in shares.values() for c in frame.columns})
    cmap = colormaps["viridis"]
    colors = {level: cmap(i / max(len(levels) - 1, 1)) for i, level in enumerate(levels)}
    fig, axes = _panels(len(shares), panel_w=3.3, panel_h=2.8)
    for ax, (group, frame) in zip(axes, shares.items()):
        frame = frame.reindex(columns=levels, fill_value=0.0)
        middle = frame.index.to_numpy() + window / 2
        ax.stackplot(middle, frame.to_numpy().T, colors=[colors[level] for level in levels],
                     labels=[f"level {level}" for level in levels])
        ax.set_ylim(0, 1)
        ax.set_title(group)
        ax.set_xlabel("training step")
    for ax in axes[:: PANEL_COLUMNS]:
        ax.set_ylabel("share of prompts rolled out")
    axes[min(len(shares), PANEL_COLUMNS) - 1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return fig
