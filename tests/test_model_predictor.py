"""ModelPredictor: a predictor written as a Pyro model only; the library's filter on it.

Each test names the mutation of the library that makes it fail (checked by hand when written).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch

from mpts.inference import decay_gaussian
from mpts.inference.adf import TemperedPriors
from mpts.models import ModelOptions, ModelPredictor, PromptPool

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "model_predictor"


class OwnLogit(ModelPredictor):
    """Each prompt's logit on its own, base prior N(0, 2^2)."""

    name = "own_logit"

    def model(self, batch):
        with batch.prompts:
            batch.observe(pyro.sample("logit", dist.Normal(0.0, 2.0)))


class Pooled(ModelPredictor):
    """Cluster means shared by their prompts: logit_i ~ N(mean[c(i)], 1)."""

    name = "pooled"

    def model(self, batch):
        with pyro.plate("clusters", batch.num_clusters):
            mean = pyro.sample("mean", dist.Normal(0.0, 2.0))
        with batch.prompts:
            batch.observe(pyro.sample("logit", dist.Normal(mean[batch.clusters], 1.0)))


@pytest.mark.parametrize("update, atol, widest", [("laplace", 0.02, 0.13), ("svi", 0.06, 0.5)])
def test_a_long_stream_recovers_each_prompts_p_and_narrows(update, atol, widest):
    """480 trials per prompt: the posterior sits on the observed rate with the spread it implies
    (~1/sqrt(k p (1 - p)) = 0.09-0.13 on the logit scale; SVI is noisier).
    Mutation: forget everything between updates (beliefs' weight always 0) -> the spread stays at
    one batch's (~0.7)."""
    true_p = torch.tensor([0.2, 0.5, 0.85])
    predictor = OwnLogit(PromptPool(3), ModelOptions(decay=1.0, update=update))
    generator = torch.Generator().manual_seed(0)
    ids, total = torch.arange(3), torch.zeros(3)
    for step in range(60):
        successes = torch.binomial(torch.full((3,), 8.0), true_p, generator=generator)
        total += successes
        predictor.observe(ids, successes, torch.full((3,), 8.0), step)
    posterior = predictor.predict(ids, 60)
    assert torch.allclose(posterior.mean, total / 480, atol=atol), (posterior.mean, total / 480)
    assert bool((posterior.scale < widest).all()), posterior.scale
    low, high = posterior.interval(0.99)
    assert bool(((low < true_p) & (true_p < high)).all())


def test_lazy_forgetting_equals_an_eager_sweep_and_unseen_prompts_get_the_model_prior():
    """Mutations: forget once however long a prompt waited (`factor(rate, 1)`) -> the eager sweep
    differs; drop the `seen` mask -> the unseen prompt's prior mixes in the state's placeholder."""
    predictor = OwnLogit(PromptPool(2), ModelOptions(decay=0.8, svi_steps=10))
    predictor.observe(torch.tensor([0]), torch.tensor([7.0]), torch.tensor([8.0]), step=3)
    loc, scale = predictor.state.prompt_loc[0, 0], predictor.state.prompt_scale[0, 0]
    for _ in range(6):  # eager: every step from 4 to 9, whether rolled out or not
        loc, scale = decay_gaussian(loc, scale, 0.0, 2.0, 0.8)
    lazy = predictor.predict(torch.tensor([0, 1]), step=9)
    assert torch.allclose(lazy.loc[0], loc, atol=1e-5) and torch.allclose(lazy.scale[0], scale, atol=1e-5)
    assert torch.allclose(lazy.loc[1], torch.tensor(0.0)) and torch.allclose(lazy.scale[1], torch.tensor(2.0))


def test_a_prediction_is_the_prior_its_next_update_starts_from():
    """The logit site's prior inside observe() at a step is what predict() gave at that step.
    Mutation: predict from the undecayed posterior (beliefs weight 1) -> differs."""
    predictor = Pooled(PromptPool(4, clusters=torch.tensor([0, 0, 1, 1])), ModelOptions(decay=0.7, svi_steps=5))
    predictor.observe(torch.tensor([0, 2]), torch.tensor([1.0, 6.0]), torch.tensor([8.0, 8.0]), step=0)
    predictor.observe(torch.tensor([0, 3]), torch.tensor([2.0, 8.0]), torch.tensor([8.0, 8.0]), step=2)
    ids, step = torch.tensor([0, 1, 2]), 5
    batch = predictor._batch(ids)
    mean = predictor.state.shared_loc  # the cluster means at their prior's location
    noise = {name: torch.zeros_like(b.loc) for name, b in predictor.beliefs(ids, step).items()}
    trace = pyro.poutine.trace(TemperedPriors(predictor.beliefs(ids, step), noise)(predictor.model)).get_trace(batch)
    prior = trace.nodes["logit"]["fn"]
    prediction = predictor.predict(ids, step)
    assert torch.allclose(prediction.loc, prior.loc, atol=1e-6)
    # the cluster mean's own uncertainty adds to the logit's: Var = scale^2 + (dloc/dmean)^2 Var(mean)
    shared = decay_gaussian(mean, predictor.state.shared_scale, 0.0, 2.0, 0.7, step - 2)[1]
    slope = 1 - predictor.beliefs(ids, step)["logit"].weight * prior.scale.square() / (
        predictor.beliefs(ids, step)["logit"].scale.square())  # d loc / d mean of the tempered prior
    expected = prior.scale.square() + (slope * shared[batch.clusters]).square()
    assert torch.allclose(prediction.scale.square(), expected, rtol=1e-4)


def test_the_shared_latents_uncertainty_reaches_an_unseen_prompts_prediction():
    """Unseen prompt, shared decay 1: Var(logit) = 1 + Var(mean[c]) exactly (linear model).
    Mutation: skip the shared sites in the delta method (`_directions` only per-prompt) -> 1."""
    predictor = Pooled(PromptPool(4, clusters=torch.tensor([0, 0, 1, 1])), ModelOptions(decay=1.0, svi_steps=20))
    predictor.observe(torch.tensor([0, 2]), torch.tensor([0.0, 8.0]), torch.tensor([8.0, 8.0]), step=0)
    prediction = predictor.predict(torch.tensor([1, 3]), step=1)
    mean_loc, mean_scale = predictor.state.shared_loc, predictor.state.shared_scale
    assert torch.allclose(prediction.loc, mean_loc, atol=1e-6)
    assert torch.allclose(prediction.scale.square(), 1 + mean_scale.square(), rtol=1e-5)
    assert prediction.loc[0] < 0 < prediction.loc[1]  # the clusters pooled their prompts' outcomes


class Diverging(OwnLogit):
    name = "diverging"
    poisoned = False

    def model(self, batch):
        with batch.prompts:
            logit = pyro.sample("logit", dist.Normal(0.0, 2.0))
            # infinite logits once the update moves the latents (the prior's own pass is left finite)
            batch.observe(logit.exp() * 1e38 if self.poisoned and logit.requires_grad else logit)


@pytest.mark.parametrize("update", ["laplace", "svi"])
def test_a_non_finite_update_raises_and_changes_nothing(update):
    """Mutations: drop laplace_posterior's finiteness check, or StreamingSVI's -> non-finite values
    are committed."""
    predictor = Diverging(PromptPool(3), ModelOptions(svi_steps=3, update=update))
    predictor.observe(torch.tensor([0, 1]), torch.tensor([3.0, 5.0]), torch.tensor([8.0, 8.0]), step=0)
    before = predictor.state_dict()
    predictor.poisoned = True
    # without Pyro's argument checks (which stop a NaN logit first), the update's own check must
    with pytest.raises(FloatingPointError, match="diverging update failed at step 1, state unchanged"), \
            pyro.validation_enabled(False):
        predictor.observe(torch.tensor([1, 2]), torch.tensor([3.0, 5.0]), torch.tensor([8.0, 8.0]), step=1)
    after = predictor.state_dict()
    assert all(torch.equal(before["state"][key], after["state"][key]) for key in before["state"])


@pytest.mark.parametrize("update", ["laplace", "svi"])
def test_state_dict_round_trip_continues_exactly(update):
    """A reloaded predictor predicts and updates as the original would (seeds come from the state).
    Mutation: seed SVI from a counter outside the state -> the next svi updates differ."""
    pool = PromptPool(5, clusters=torch.tensor([0, 0, 1, 1, 2]))
    original = Pooled(pool, ModelOptions(svi_steps=4, update=update), seed=3)
    for step in range(3):
        original.observe(torch.tensor([step, step + 2]), torch.tensor([2.0, 6.0]), torch.tensor([8.0, 8.0]), step)
    copy = Pooled(pool, ModelOptions(svi_steps=4, update=update), seed=3)
    copy.load_state_dict(original.state_dict())
    ids = torch.arange(5)
    assert torch.equal(copy.predict(ids, 4).loc, original.predict(ids, 4).loc)
    for predictor in (original, copy):
        predictor.observe(torch.tensor([1, 4]), torch.tensor([1.0, 7.0]), torch.tensor([8.0, 8.0]), step=4)
    assert all(torch.equal(a, b) for a, b in zip(original.state_dict()["state"].values(),
                                                 copy.state_dict()["state"].values()))
    wrong = original.state_dict()
    wrong["state"]["prompt_loc"] = torch.zeros(5, 2)
    with pytest.raises(ValueError, match="prompt_loc"):
        copy.load_state_dict(wrong)


def test_declaration_errors_are_one_line():
    class BetaLatent(ModelPredictor):
        name = "beta_latent"

        def model(self, batch):
            with batch.prompts:
                p = pyro.sample("p", dist.Beta(1.0, 1.0))
                batch.observe(torch.logit(p))

    class Silent(ModelPredictor):
        name = "silent"

        def model(self, batch):
            with batch.prompts:
                pyro.sample("logit", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="latent site 'p' has a Beta prior; a filtered latent must be dist.Normal"):
        BetaLatent(PromptPool(3))
    with pytest.raises(ValueError, match="model must call batch.observe"):
        Silent(PromptPool(3))
    with pytest.raises(ValueError, match="decay: unknown part 'logits'; parts are 'prompts', 'shared' and the "
                                         "model's latents logit"):
        OwnLogit(PromptPool(3), ModelOptions(decay={"logits": 0.5}))
    with pytest.raises(ValueError, match="decay must be in"):
        ModelOptions(decay={"prompts": 1.5})
    assert Pooled(PromptPool(3), ModelOptions(decay={"mean": 0.5})).rates == {"mean": 0.5, "logit": 0.99}


def test_the_model_only_example_runs_through_ablate_replay_and_report(tmp_path, monkeypatch, capsys):
    """examples/model_predictor: a plugin with only a model, through the three commands.
    Mutation: replay ignores --plugin -> "unknown predictor 'skill_difficulty'"."""
    from mpts.training.cli import main

    monkeypatch.setenv("PYTHONPATH", str(EXAMPLE))  # the ablation's worker processes import the plugin
    monkeypatch.syspath_prepend(str(EXAMPLE))
    overrides = ["steps=4", "batch_size=8", "candidate_ratio=2", "env.num_prompts=60", "env.eval_prompts=30",
                 "ablation.seeds=[0]", "ablation.workers=1"]
    out = tmp_path / "abl"
    args = ["ablate", str(EXAMPLE / "skill_difficulty.yaml"), "--out", str(out)]
    assert main(args + [a for o in overrides for a in ("--set", o)]) == 0
    runs = pd.read_parquet(out / "runs.parquet")
    assert set(runs["predictor"]) == {"beta", "skill_difficulty"}
    assert (out / "runs" / "skill_difficulty__thompson_target__seed0" / "trace.parquet").exists()
    capsys.readouterr()
    scores = tmp_path / "scores.json"
    replay = ["replay", str(out / "runs" / "beta__uniform__seed0"), "--predictor", "skill_difficulty",
              "--plugin", "skill_difficulty", "--out", str(scores)]
    # a fresh interpreter, so that only --plugin can have registered the predictor there
    subprocess.run([sys.executable, "-c", f"from mpts.training.cli import main; raise SystemExit(main({replay!r}))"],
                   check=True)
    replayed = json.loads(scores.read_text())
    assert replayed["predictor"] == "skill_difficulty" and replayed["steps"] == 4
    assert math.isfinite(replayed["log_predictive_density"])
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert any("skill_difficulty" in group["group"] for group in summary["groups"])


def test_the_laplace_update_is_exact_on_a_gaussian_model():
    """Normal prior, Normal likelihood: the projection is the exact posterior and its "elbo" entry
    the exact -log p(batch). Mutations: leave out the curvature's log-determinant -> the evidence is
    off; take the curvature of the prior alone -> the scale stays at the prior's."""
    from mpts.inference.adf import Belief, laplace_posterior

    def model(x):
        with pyro.plate("prompts", 2):
            z = pyro.sample("z", dist.Normal(0.0, 2.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    x = torch.tensor([1.0, -3.0])
    posterior, info = laplace_posterior(model, {"z": Belief(torch.zeros(2), torch.ones(2), torch.zeros(2))}, x)
    loc, scale = posterior["z"]
    assert torch.allclose(loc, x * 4 / 5, atol=1e-5) and torch.allclose(scale, torch.full((2,), math.sqrt(0.8)))
    evidence = dist.Normal(0.0, math.sqrt(5.0)).log_prob(x).sum()
    assert info["elbo"][0] == pytest.approx(-float(evidence), abs=1e-4)


def test_predictions_are_calibrated_on_the_models_own_world():
    """Prompts drawn from the model's own prior, observed for a few steps (no forgetting): the true
    p lies in the 50% / 90% predictive intervals about 50% / 90% of the time (within 3 standard
    errors), and the randomised PIT of the next outcomes has mean 1/2.
    Mutation: halve the predicted logit scale -> 90% coverage falls to ~0.6."""
    n, k = 400, 8
    generator = torch.Generator().manual_seed(1)
    true_logit = 2.0 * torch.randn(n, generator=generator)
    true_p = torch.sigmoid(true_logit)
    predictor = OwnLogit(PromptPool(n), ModelOptions(decay=1.0))
    ids = torch.arange(n)
    for step in range(3):
        seen = ids[torch.rand(n, generator=generator) < 0.7]
        predictor.observe(seen, torch.binomial(torch.full((seen.shape[0],), float(k)), true_p[seen],
                                               generator=generator), torch.full((seen.shape[0],), float(k)), step)
    posterior = predictor.predict(ids, 3)
    for level in (0.5, 0.9):
        low, high = posterior.interval(level)
        coverage = float(((low <= true_p) & (true_p <= high)).double().mean())
        assert abs(coverage - level) < 3 * math.sqrt(level * (1 - level) / n), (level, coverage)
    outcomes = torch.binomial(torch.full((n,), float(k)), true_p, generator=generator)
    pit = posterior.predictive_pit(outcomes, torch.full((n,), float(k)), generator=generator)
    assert abs(float(pit.mean()) - 0.5) < 3 * math.sqrt(1 / 12 / n)


def test_the_update_agrees_with_an_independent_laplace_computation():
    """OwnLogit after prompts waited between updates: each prompt's posterior is the mode and the
    curvature of log N(x; prior) + s log sigmoid(x) + (k - s) log sigmoid(-x), computed here with
    scipy from a prior formed here (natural parameters interpolated with lam**waited).
    Mutation: forget twice (weight lam**(2 waited)) -> the posteriors differ."""
    from scipy import optimize, special

    lam, k = 0.8, 8.0
    predictor = OwnLogit(PromptPool(6), ModelOptions(decay=lam))
    generator = torch.Generator().manual_seed(2)
    truth = torch.rand(6, generator=generator)
    expected = {}  # prompt -> (loc, scale, step) computed independently
    for step, ids in ((0, [0, 1, 2, 3]), (2, [2, 3, 4]), (5, [0, 3, 5])):
        ids_t = torch.tensor(ids)
        successes = torch.binomial(torch.full((len(ids),), k), truth[ids_t], generator=generator)
        predictor.observe(ids_t, successes, torch.full((len(ids),), k), step)
        for i, s in zip(ids, successes.tolist()):
            prior_precision, prior_shift = 0.25, 0.0  # N(0, 2^2) in natural parameters
            if i in expected:
                loc, scale, last = expected[i]
                w = lam ** (step - last)
                prior_precision = w / scale**2 + (1 - w) * 0.25
                prior_shift = w * loc / scale**2
            prior_loc = prior_shift / prior_precision

            def negative_log_joint(x):
                return (0.5 * prior_precision * (x - prior_loc) ** 2
                        - s * np.log(special.expit(x)) - (k - s) * np.log(special.expit(-x)))

            mode = optimize.minimize_scalar(negative_log_joint, bounds=(-30, 30), method="bounded",
                                            options={"xatol": 1e-10}).x
            curvature = prior_precision + k * special.expit(mode) * special.expit(-mode)
            expected[i] = (mode, curvature ** -0.5, step)
    for i, (loc, scale, _) in expected.items():
        assert float(predictor.state.prompt_loc[i, 0]) == pytest.approx(loc, abs=1e-4), i
        assert float(predictor.state.prompt_scale[i, 0]) == pytest.approx(scale, rel=1e-4), i


def test_the_svi_update_uses_the_predictors_guide_class():
    """`Guide` names the AutoNormal (sub)class the svi update fits.
    Mutation: fit_posterior ignores guide_class -> the subclass is never built."""
    from pyro.infer.autoguide import AutoNormal

    built = []

    class CountingGuide(AutoNormal):
        def __init__(self, *args, **kwargs):
            built.append(self)
            super().__init__(*args, **kwargs)

    class WithGuide(OwnLogit):
        Guide = CountingGuide

    predictor = WithGuide(PromptPool(3), ModelOptions(update="svi", svi_steps=2, num_particles=1))
    predictor.observe(torch.tensor([0, 1]), torch.tensor([3.0, 5.0]), torch.tensor([8.0, 8.0]), step=0)
    assert len(built) == 1
