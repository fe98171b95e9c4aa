"""Every predictor's prequential log predictive density beats a constant (pool-mean) predictor
on the simulated learner: the prediction for each rolled-out prompt, made before its outcome,
against Binomial(k, p_bar) with p_bar the pooled success rate of all earlier steps."""

import pandas as pd
import pytest
from scipy import stats

from mpts.training.config import load_config
from mpts.training.loop import run

PREDICTORS = {
    "beta": "{name: beta}",
    "hmm3": "{name: hmm3}",
    "hmm3_pooled": "{name: hmm3_pooled}",
    "id_vae": "{name: id_vae, svi_steps: 3}",
    "gp": "{name: gp, svi_steps: 2, num_inducing: 64}",
}


def constant_log_predictive_density(trace: pd.DataFrame) -> float:
    per_step = trace.groupby("step")[["successes", "trials"]].sum()
    earlier_s = per_step["successes"].cumsum().shift(fill_value=0)
    earlier_n = per_step["trials"].cumsum().shift(fill_value=0)
    p_bar = ((earlier_s + 1) / (earlier_n + 2)).rename("p_bar")  # Laplace: 0.5 before any outcome
    rows = trace.join(p_bar, on="step")
    return float(stats.binom.logpmf(rows["successes"], rows["trials"], rows["p_bar"]).mean())


@pytest.mark.parametrize("name", sorted(PREDICTORS))
def test_prequential_density_beats_the_pool_mean(tmp_path, name):
    config = load_config("quickstart", [
        "steps=40", "batch_size=32", "candidate_ratio=2", "env.num_prompts=300", "env.eval_prompts=100",
        f"predictor={PREDICTORS[name]}", "acquisition={name: uniform}", "posterior_draws_prompts=0"])
    summary = run(config, tmp_path / name)
    trace = pd.read_parquet(tmp_path / name / "trace.parquet")
    constant = constant_log_predictive_density(trace)
    assert summary["log_predictive_density"] > constant + 0.1, (summary["log_predictive_density"], constant)
