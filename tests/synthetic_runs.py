"""Synthetic run folders in the documented run-folder format, for report tests and demos.

`write_run` fakes one run of the loop with numpy: a learner whose skill grows each step (faster
when the rule picks prompts near p = 0.5), Binomial outcomes, and a predictor whose Beta beliefs
are noisier (and, for "overconfident" predictors, too concentrated) than the truth. Predictions
are turned into every trace column exactly as their definitions say (Beta-Binomial predictive).
`write_ablation` lays out predictors x rules x seeds under `root/runs/<p>__<a>__seed<s>/`.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from scipy import stats
from scipy.special import expit, logit

from mpts.inference.scoring import score_trace
from mpts.training.run_dir import TRACE_SCHEMA

SVI_PREDICTORS = {"id_vae", "gp", "hmm3"}
# noise sd on the logit of the prediction, and concentration of the predicted Beta
PREDICTOR_QUALITY = {"beta": (0.9, 6.0), "id_vae": (0.4, 12.0), "hmm3": (0.6, 8.0), "gp": (0.5, 30.0)}
RULE_SPEED = {"uniform": 0.03, "thompson_target": 0.05, "dynamic_sampling": 0.045, "p_informative": 0.05}


def _rng(*parts: object) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32("/".join(map(str, parts)).encode()))


def _prediction_columns(mean: np.ndarray, concentration: float, successes: np.ndarray, k: int,
                        rng: np.random.Generator) -> dict[str, np.ndarray]:
    a, b = mean * concentration, (1 - mean) * concentration
    predictive = stats.betabinom(k, a, b)
    p_unsolved, p_solved = predictive.pmf(0), predictive.pmf(k)
    pmf = predictive.pmf(successes)
    below = np.where(successes > 0, predictive.cdf(successes - 1), 0.0)
    return {
        "pred_mean": mean, "pred_var": a * b / ((a + b) ** 2 * (a + b + 1)),
        "pred_p_informative": np.clip(1 - p_unsolved - p_solved, 0, 1),
        "pred_p_unsolved": p_unsolved, "pred_p_solved": p_solved,
        "pred_log_prob": predictive.logpmf(successes), "pred_pit": below + rng.uniform(size=mean.size) * pmf,
        "pred_q05": stats.beta.ppf(0.05, a, b), "pred_q25": stats.beta.ppf(0.25, a, b),
        "pred_q75": stats.beta.ppf(0.75, a, b), "pred_q95": stats.beta.ppf(0.95, a, b),
    }


def write_run(folder: Path, *, predictor: str, acquisition: str, seed: int, steps: int = 30,
              batch_size: int = 16, k: int = 8, pool_size: int = 300, target_accuracy: float = 0.6,
              eval_every: int = 2, draws_prompts: int = 12, num_draws: int = 100,
              failure_rate: float = 0.02) -> Path:
    """One fake run folder; returns it. Deterministic in (predictor, acquisition, seed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = _rng(predictor, acquisition, seed)
    world = np.random.default_rng(seed)  # same prompts and eval set for every arm of one seed
    difficulty = world.normal(-0.6, 1.4, size=pool_size)
    eval_difficulty = world.normal(-0.6, 1.4, size=200)
    noise_sd, concentration = PREDICTOR_QUALITY.get(predictor, (0.7, 10.0))
    speed = RULE_SPEED.get(acquisition, 0.04)
    rolls_out_all = acquisition == "dynamic_sampling"

    skill, cumulative, wall = 0.0, 0, 0.0
    trace_parts, metric_rows = [], []
    for step in range(steps):
        true_p = expit(difficulty + skill)
        believed = expit(logit(np.clip(true_p, 1e-4, 1 - 1e-4)) + rng.normal(0, noise_sd, pool_size))
        believed = np.clip(believed, 1e-3, 1 - 1e-3)
        candidates = rng.choice(pool_size, size=min(8 * batch_size, pool_size), replace=False)
        if acquisition == "uniform":
            chosen = candidates[:batch_size]
        elif rolls_out_all:
            chosen = candidates[: 2 * batch_size]
        else:
            chosen = candidates[np.argsort(np.abs(believed[candidates] - 0.5))[:batch_size]]
        n = chosen.size
        successes = rng.binomial(k, true_p[chosen])
        failed = rng.uniform(size=n) < failure_rate
        informative = (successes > 0) & (successes < k)
        columns = _prediction_columns(believed[chosen], concentration, successes, k, rng)
        columns["pred_log_prob"] = np.where(failed, np.nan, columns["pred_log_prob"])
        columns["pred_pit"] = np.where(failed, np.nan, columns["pred_pit"])
        kept = (informative & ~failed) if rolls_out_all else ~failed
        trace_parts.append(pd.DataFrame({
            "step": np.full(n, step, dtype=np.int64), "prompt_id": chosen.astype(np.int64),
            "successes": successes.astype(np.int64), "trials": np.full(n, k, dtype=np.int64), **columns,
            "selected_by": np.full(n, acquisition, dtype=object), "kept": kept, "failed": failed,
            "true_p": true_p[chosen],
        }))
        skill += speed * (0.5 + informative[~failed].mean())
        phases = {"predict_seconds": rng.uniform(0.01, 0.03), "select_seconds": rng.uniform(0.001, 0.004),
                  "rollout_seconds": rng.uniform(0.3, 0.5) * n / batch_size, "observe_seconds": rng.uniform(0.02, 0.05),
                  "train_seconds": rng.uniform(0.2, 0.3), "eval_seconds": rng.uniform(0.01, 0.02)}
        wall += sum(phases.values()) + 0.005
        cumulative += n * k
        evaluate = (step + 1) % eval_every == 0 or step == steps - 1
        metric_rows.append({
            "step": step, "rollouts": n * k, "cumulative_rollouts": cumulative, "prompts_rolled_out": n,
            "effective_ratio": float(informative[~failed].mean()),
            "train_accuracy": float((successes[~failed] / k).mean()),
            "eval_accuracy": float(expit(eval_difficulty + skill).mean()) if evaluate else float("nan"),
            "wall_seconds": wall, **phases, "sync_seconds": rng.uniform(0.05, 0.1),
            "elbo": (float(200 * np.exp(-step / 8) + 50 + rng.normal(0, 3)) if predictor in SVI_PREDICTORS
                     else float("nan")),
            "failed_prompts": int(failed.sum()),
        })
    trace = pd.concat(trace_parts, ignore_index=True)
    metrics = pd.DataFrame(metric_rows)
    pq.write_table(pa.Table.from_pandas(trace, schema=TRACE_SCHEMA, preserve_index=False), folder / "trace.parquet")
    pq.write_table(pa.Table.from_pandas(metrics, preserve_index=False), folder / "metrics.parquet")

    config = {"name": "synthetic", "seed": seed, "steps": steps, "batch_size": batch_size, "k": k,
              "target_accuracy": target_accuracy, "eval_every": eval_every, "posterior_draws_prompts": draws_prompts,
              "env": {"name": "sim"}, "predictor": {"name": predictor}, "acquisition": {"name": acquisition}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    if draws_prompts:
        ids = np.sort(rng.choice(pool_size, size=draws_prompts, replace=False))
        true_p = expit(difficulty[ids] + skill)
        mean = np.clip(expit(logit(true_p) + rng.normal(0, noise_sd, ids.size)), 1e-3, 1 - 1e-3)
        p = rng.beta(mean * concentration, (1 - mean) * concentration, size=(num_draws, ids.size))
        pd.DataFrame({
            "prompt_id": np.repeat(ids, num_draws).astype(np.int64),
            "draw": np.tile(np.arange(num_draws), ids.size).astype(np.int64),
            "p": p.T.reshape(-1), "true_p": np.repeat(true_p, num_draws),
        }).to_parquet(folder / "posterior_draws.parquet", index=False)

    evals = metrics["eval_accuracy"].dropna()
    reached = metrics[metrics["eval_accuracy"] >= target_accuracy]
    summary = {
        "predictor": predictor, "acquisition": acquisition, "seed": seed, "steps": steps,
        "target_accuracy": target_accuracy,
        "rollouts_to_target": float(reached["cumulative_rollouts"].iloc[0]) if len(reached) else float("nan"),
        "final_eval_accuracy": float(evals.iloc[-1]), "total_rollouts": int(cumulative),
        "mean_effective_ratio": float(metrics["effective_ratio"].mean()), "wall_seconds": float(wall),
        **score_trace(trace),
    }
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    return folder


def write_ablation(root: Path, predictors: Sequence[str] = ("beta", "id_vae"),
                   rules: Sequence[str] = ("uniform", "thompson_target"), seeds: Sequence[int] = (0, 1),
                   **run_options) -> Path:
    """An ablation folder: root/runs/<predictor>__<rule>__seed<s>/ for every combination."""
    root = Path(root)
    for predictor in predictors:
        for rule in rules:
            for seed in seeds:
                write_run(root / "runs" / f"{predictor}__{rule}__seed{seed}", predictor=predictor,
                          acquisition=rule, seed=seed, **run_options)
    return root
