"""Why gp's intervals were too narrow, and how calibrated a run's are: prints, per run folder, the
logit error of the prediction against the true p beside the predicted logit sd, and the scores.

    python benchmarks/gp_calibration.py RUN_DIR [RUN_DIR ...]      # simulator runs (true_p logged)
    python benchmarks/gp_calibration.py --explainable 0 1          # what the simulator's features can explain
    python benchmarks/gp_calibration.py --prequential 5 1 2 3      # tests/test_gp_embed.py's check, per seed

Per run: rms of logit(true p) - predicted logit centre, the mean predicted logit sd (both read
off the logged 5%/95% quantiles, exact for a LogitNormal predictive), then score_trace's
coverage90 (predictive PIT), coverage90_true (interval for p holds the true p), ECE and LPD.
`--explainable SEED...`: sd of slope * difficulty (the logit's per-prompt part) before and after
an in-sample least-squares fit on the pool features plus the true cluster, i.e. the spread among
prompts that no smooth function of the embedding can remove.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import logit
from scipy.stats import norm

from mpts.inference.scoring import score_trace

_Z90 = float(norm.ppf(0.95))


def describe_run(run: Path) -> dict[str, float]:
    trace = pd.read_parquet(run / "trace.parquet")
    trace = trace[~trace["failed"].fillna(False).astype(bool)]
    low, high = (logit(trace[c].clip(1e-7, 1 - 1e-7).to_numpy()) for c in ("pred_q05", "pred_q95"))
    centre, sd = (low + high) / 2, (high - low) / (2 * _Z90)
    error = logit(trace["true_p"].clip(1e-7, 1 - 1e-7).to_numpy()) - centre
    scores = score_trace(trace)
    return {"rms_logit_error": float(np.sqrt(np.mean(error**2))), "mean_logit_sd": float(sd.mean()),
            **{key: scores[key] for key in ("coverage90", "coverage90_true", "ece", "log_predictive_density")}}


def explainable(seed: int) -> dict[str, float]:
    from mpts.training.environments.simulator import SimulatedLearner

    env = SimulatedLearner(seed=seed)
    target = env.options.slope * env.difficulty.numpy()
    onehot = np.eye(env.options.num_clusters)[env.clusters.numpy()]
    design = np.hstack([env.pool.features.numpy(), onehot, np.ones((len(target), 1))])
    coefficients, *_ = np.linalg.lstsq(design, target, rcond=None)
    return {"logit_sd": float(target.std()), "residual_sd_after_fit": float(np.std(target - design @ coefficients))}


def prequential(seed: int, steps: int = 30, k: int = 8) -> dict[str, float]:
    """The coverage check of tests/test_gp_embed.py on the learner of `seed` (the test uses 5): 600
    prompts in 4 clusters, competence that jumps at step 12, 48 of 192 random candidates chosen by
    predicted p nearest 1/2, each step predicted before its outcomes; steps 0-2 are not scored."""
    import torch

    from mpts.models.gp_embed import EmbeddingGP, EmbeddingGPOptions
    from mpts.training.environments.simulator import SimulatedLearner, SimulatorOptions

    env = SimulatedLearner(SimulatorOptions(num_prompts=600, num_clusters=4, jump_step=12, jump_size=-1.5), seed=seed)
    predictor = EmbeddingGP(env.pool, EmbeddingGPOptions(num_inducing=64, svi_steps=10), seed=0)
    g = torch.Generator().manual_seed(11)
    pits, inside = [], []
    for step in range(steps):
        candidates = torch.randperm(600, generator=g)[:192]
        ids = candidates[(predictor.predict(candidates, step).mean - 0.5).abs().argsort()[:48]]
        outcomes = env.rollout(ids, k)
        posterior = predictor.predict(ids, step)
        if step >= 3:
            pits.append(posterior.predictive_pit(outcomes.successes, outcomes.trials, generator=g))
            lo, hi = posterior.interval(0.9)
            inside.append((lo <= outcomes.true_p) & (outcomes.true_p <= hi))
        predictor.observe(ids, outcomes.successes, outcomes.trials, step)
        env.train_on(outcomes)
    pit = torch.cat(pits)
    return {"coverage90": float(((pit >= 0.05) & (pit <= 0.95)).float().mean()),
            "coverage90_true": float(torch.cat(inside).float().mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", type=Path)
    parser.add_argument("--explainable", nargs="+", type=int, metavar="SEED")
    parser.add_argument("--prequential", nargs="+", type=int, metavar="SEED")
    args = parser.parse_args()
    for seed in args.prequential or []:
        print(json.dumps({"seed": seed, **prequential(seed)}), flush=True)
    for seed in args.explainable or []:
        print(json.dumps({"seed": seed, **explainable(seed)}))
    for run in args.runs:
        if not (run / "trace.parquet").is_file():
            parser.error(f"{run} has no trace.parquet")
        print(json.dumps({"run": str(run), **describe_run(run)}))


if __name__ == "__main__":
    main()
