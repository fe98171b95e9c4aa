"""Identifier-conditioned VAE (MPTS): generative model pieces, learning on known truth, state."""

from __future__ import annotations

import io
import dataclasses
import math

import pytest
import torch
from pydantic import ValidationError
from scipy.stats import spearmanr

from mpts.models import id_vae
from mpts.models.base import PromptPool
from mpts.models.id_vae import IdentifierNetworks, IdentifierVAE, IdentifierVAEOptions, condition_rows
from mpts.models.posteriors import PointMassPosterior
from mpts.models.registry import get_predictor_class

SMALL = dict(latent_dim=4, embedding_dim=4, hash_buckets=4096, hidden_dim=16, svi_steps=4, lr=0.03)


class World:
    """Known truth: p_i(t) = sigmoid(theta_t - d_i), with d_i partly readable from features."""

    def __init__(self, num_prompts=2400, feature_dim=6, noise=0.5, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.features = torch.randn(num_prompts, feature_dim, generator=g)
        weights = 1.5 * torch.randn(feature_dim, generator=g) / math.sqrt(feature_dim)
        self.difficulty = self.features @ weights + noise * torch.randn(num_prompts, generator=g)
        self.generator = g

    def pool(self, with_features=True):
        return PromptPool(size=self.features.shape[0], features=self.features if with_features else None)

    def p(self, ids, theta):
        return torch.sigmoid(theta - self.difficulty[ids])

    def rollout(self, ids, theta, k=8):
        trials = torch.full((ids.shape[0],), float(k))
        return torch.binomial(trials, self.p(ids, theta), generator=self.generator), trials


def stream(predictor, world, ids_range, steps, theta, batch=128, start=0, record=None):
    """Prequential loop: predict the batch, then observe it. `theta(step)` is the learner state."""
    for step in range(start, start + steps):
        ids = ids_range[torch.randperm(ids_range.shape[0], generator=world.generator)[:batch]]
        successes, trials = world.rollout(ids, theta(step))
        if record is not None:
            record(step, ids, successes, trials, predictor.predict(ids, step))
        predictor.observe(ids, successes, trials, step)


def trained(world, steps=12, seed=0, **options):
    predictor = IdentifierVAE(world.pool(), IdentifierVAEOptions(**{**SMALL, **options}), seed=seed)
    stream(predictor, world, torch.arange(2000), steps, lambda t: -1.0 + 0.05 * t)
    return predictor


# -- options and registry -----------------------------------------------------------------------------
def test_registry_names_the_class():
    assert get_predictor_class("id_vae") is IdentifierVAE
    assert IdentifierVAE.name == "id_vae"


def test_predicts_before_any_outcome():
    predictor = IdentifierVAE(PromptPool(size=1000), IdentifierVAEOptions(**SMALL))
    posterior = predictor.predict(torch.arange(1000), 0)
    assert torch.allclose(posterior.loc, posterior.loc[0].expand(1000))  # nothing tells prompts apart yet
    assert float(posterior.scale.min()) > 1.0  # and the prior is broad


def test_options_are_strict():
    with pytest.raises(ValidationError, match="hash_bucket"):
        IdentifierVAEOptions(hash_bucket=10)
    with pytest.raises(ValidationError, match="latent_dim"):
        IdentifierVAEOptions(latent_dim=0)
    with pytest.raises(ValidationError, match="decay"):
        IdentifierVAEOptions(decay=1.5)
    assert IdentifierVAEOptions().hash_buckets >= 2**16  # 10^6 prompts hash into the default table


# -- generative-model pieces ------------------------------------------------------------------------
def test_condition_rows_matches_exact_posterior_of_the_logit():
    """Moment matching along the loading equals brute-force integration over the code."""
    torch.manual_seed(0)
    n, rows, dim = 5, 2, 3
    rows_loc, rows_var = torch.randn(n, rows, dim), torch.rand(n, rows, dim) + 0.2
    offset, loadings = torch.randn(n), torch.randn(n, dim)
    trials = torch.full((n,), 8.0)
    successes = torch.tensor([0.0, 2.0, 4.0, 7.0, 8.0])
    new_loc, new_var = condition_rows(rows_loc, rows_var, offset, loadings, successes, trials)
    # eta = a . sum_r row_r is Gaussian a priori; its exact posterior by dense grid integration.
    eta_loc = (loadings.unsqueeze(1) * rows_loc).sum((1, 2))
    eta_sd = (loadings.unsqueeze(1).square() * rows_var).sum((1, 2)).sqrt()
    grid = eta_loc + eta_sd * torch.linspace(-10, 10, 20001).unsqueeze(1)
    log_post = (-0.5 * ((grid - eta_loc) / eta_sd) ** 2
                + torch.distributions.Binomial(trials, logits=offset + grid).log_prob(successes))
    w = torch.softmax(log_post.double(), 0)
    exact_mean = (w * grid).sum(0)
    exact_var = (w * (grid - exact_mean) ** 2).sum(0)
    got_mean = (loadings.unsqueeze(1) * new_loc).sum((1, 2))
    torch.testing.assert_close(got_mean.double(), exact_mean, atol=2e-3, rtol=2e-3)
    # Variances: diagonal, each precision gaining a_d^2 g with one g per prompt, such that the
    # variance of eta the rows imply is its exact posterior variance.
    implied = (loadings.unsqueeze(1).double().square() * new_var.double()).sum((1, 2))
    torch.testing.assert_close(implied, exact_var, atol=2e-3, rtol=5e-3)
    gain = (1 / new_var.double() - 1 / rows_var.double()) / loadings.unsqueeze(1).double().square()
    torch.testing.assert_close(gain, gain[:, :1, :1].expand_as(gain), atol=1e-3, rtol=1e-3)
    assert bool((new_var <= rows_var).all())


def test_code_marginal_is_the_logit_normal_binomial():
    """The model's likelihood (code integrated out) against dense integration over the logit."""
    loc = torch.tensor([-3.0, -0.5, 0.0, 1.0, 4.0])
    scale = torch.tensor([0.05, 0.5, 1.0, 2.0, 3.0])
    trials = torch.full((5,), 8.0)
    marginal = id_vae.BinomialLogitNormal(trials, loc, scale)
    grid = torch.linspace(-12, 12, 48001, dtype=torch.float64).unsqueeze(1)  # standard-normal units
    logits = loc.double() + scale.double() * grid
    log_density = -0.5 * grid.square() - 0.5 * math.log(2 * math.pi) + math.log(24 / 48000)
    for count in range(9):
        s = torch.full((5,), float(count))
        exact = torch.logsumexp(torch.distributions.Binomial(8.0, logits=logits).log_prob(s.double()) + log_density, 0)
        torch.testing.assert_close(marginal.log_prob(s).double(), exact, atol=2e-3, rtol=0)
    total = torch.stack([marginal.log_prob(torch.full((5,), float(c))) for c in range(9)]).exp().sum(0)
    torch.testing.assert_close(total, torch.ones(5), atol=1e-3, rtol=0)


def test_decode_belief_is_the_delta_method_in_z_and_exact_in_the_code():
    torch.manual_seed(1)
    nets = IdentifierNetworks(feature_dim=3, code_dim=2, latent_dim=4, hidden_dim=8)
    with torch.no_grad():
        nets.head.weight.normal_()
    trunk = nets.trunk_of(torch.randn(6, 3), 6)
    z_loc, z_scale = torch.randn(4), torch.rand(4)
    code_loc, code_var = torch.randn(6, 2), torch.rand(6, 2)

    def logit_mean(z):
        offset, loadings = nets.decode(trunk, z)
        return offset + (loadings * code_loc).sum(1)

    mean, variance = nets.decode_belief(trunk, z_loc, z_scale, code_loc, code_var)
    jacobian = torch.autograd.functional.jacobian(logit_mean, z_loc)
    loadings = nets.decode(trunk, z_loc)[1]
    expected = (loadings.square() * code_var).sum(1) + (jacobian * z_scale).square().sum(1)
    torch.testing.assert_close(mean, logit_mean(z_loc).detach())
    torch.testing.assert_close(variance, expected.detach(), rtol=1e-4, atol=1e-5)


def test_hashing_is_seeded_and_in_range():
    pool = PromptPool(size=10**6)
    a = IdentifierVAE(pool, IdentifierVAEOptions(**SMALL), seed=3)
    b = IdentifierVAE(pool, IdentifierVAEOptions(**SMALL), seed=3)
    ids = torch.randperm(10**6, generator=torch.Generator().manual_seed(0))[:20000]
    buckets = a._buckets(ids)
    assert buckets.shape == (ids.shape[0], 2)
    assert int(buckets.min()) >= 0 and int(buckets.max()) < SMALL["hash_buckets"]
    torch.testing.assert_close(buckets, b._buckets(ids))
    # the two hashes disagree, so two ids share both rows only rarely
    assert float((buckets[:, 0] == buckets[:, 1]).float().mean()) < 0.01
    # 20000 ids into 4096 rows fill ~99% of them when the hash spreads evenly
    assert torch.unique(buckets[:, 0]).numel() > 0.97 * SMALL["hash_buckets"]


# -- learning on known truth ----------------------------------------------------------------------
def test_predicts_never_rolled_out_prompts_and_beats_a_constant():
    world = World(seed=0)
    predictor = IdentifierVAE(world.pool(), IdentifierVAEOptions(**SMALL), seed=0)
    theta = lambda t: -1.0 + 0.04 * t  # noqa: E731  the learner improves steadily
    scores = {"model": 0.0, "constant": 0.0}
    seen = {"rate": 0.0, "count": 0}

    def record(step, ids, successes, trials, posterior):
        if step >= 5:
            constant = PointMassPosterior(torch.full(ids.shape, seen["rate"] / seen["count"]))
            scores["model"] += float(posterior.log_prob(successes, trials).sum())
            scores["constant"] += float(constant.log_prob(successes, trials).sum())
        seen["rate"] += float((successes / trials).sum())
        seen["count"] += ids.shape[0]

    stream(predictor, world, torch.arange(2000), 40, theta, record=record)
    held_out = torch.arange(2000, 2400)  # never rolled out: the features must carry the prediction
    posterior = predictor.predict(held_out, 40)
    truth = world.p(held_out, theta(40))
    rho = spearmanr(posterior.mean.numpy(), truth.numpy()).correlation
    assert rho > 0.8, f"held-out Spearman {rho:.3f}"
    assert abs(float(posterior.mean.mean() - truth.mean())) < 0.15
    per_prompt = {key: value / (35 * 128) for key, value in scores.items()}
    assert per_prompt["model"] > per_prompt["constant"] + 0.6, per_prompt


def test_code_remembers_prompts_without_features():
    """No features: only the hashed per-prompt code can tell prompts apart."""
    world = World(num_prompts=300, noise=1.5, seed=1)
    predictor = IdentifierVAE(world.pool(with_features=False), IdentifierVAEOptions(**SMALL), seed=1)
    observed = torch.arange(200)
    stream(predictor, world, observed, 30, lambda t: 0.0, batch=100)
    posterior = predictor.predict(torch.arange(300), 30)
    truth = world.p(observed, 0.0)
    rho = spearmanr(posterior.mean[:200].numpy(), truth.numpy()).correlation
    assert rho > 0.7, f"Spearman on observed prompts {rho:.3f}"
    # never-observed prompts keep the wide prior spread; observed ones are sharper
    assert float(posterior.scale[200:].mean()) > 1.5 * float(posterior.scale[:200].mean())


def test_posterior_over_z_tracks_a_shift_in_the_learner():
    world = World(seed=2)
    predictor = IdentifierVAE(world.pool(), IdentifierVAEOptions(**SMALL), seed=2)
    train, probe = torch.arange(2000), torch.arange(2000, 2400)
    stream(predictor, world, train, 30, lambda t: -2.5 + 0.05 * t)  # steady progress, then a jump
    before = predictor.predict(probe, 30).mean.mean()
    state_before = predictor.state
    stream(predictor, world, train, 6, lambda t: 1.5, start=30)
    after = predictor.predict(probe, 36).mean.mean()
    truth_change = float(world.p(probe, 1.5).mean() - world.p(probe, -1.0).mean())
    assert abs(float(after - before) - truth_change) < 0.3 * truth_change
    # It is z that moved: the current decoder at the old belief over z predicts the old level.
    z_before = (state_before.z_loc, state_before.z_scale)
    z_after = (predictor.state.z_loc, predictor.state.z_scale)
    state_after = predictor.state
    predictor.state = dataclasses.replace(state_after, z_loc=z_before[0], z_scale=z_before[1])
    at_old_z = predictor.predict(probe, int(state_after.last_step)).mean.mean()
    predictor.state = state_after
    assert float(after - at_old_z) > 0.6 * truth_change
    assert float(((z_after[0] - z_before[0]) / z_after[1]).norm()) > 3.0


# -- the observe() contract -------------------------------------------------------------------------
def test_observe_reports_the_negative_elbo_of_each_step():
    world = World(seed=3)
    predictor = IdentifierVAE(world.pool(), IdentifierVAEOptions(**SMALL), seed=3)
    ids = torch.arange(64)
    successes, trials = world.rollout(ids, 0.0)
    diagnostics = predictor.observe(ids, successes, trials, 0)
    assert len(diagnostics["elbo"]) == SMALL["svi_steps"]
    assert all(math.isfinite(value) for value in diagnostics["elbo"])


def test_failed_update_leaves_predictions_unchanged(monkeypatch):
    world = World(seed=4)
    predictor = trained(world, steps=5, seed=4)
    probe = torch.arange(0, 2400, 7)
    before = predictor.predict(probe, 5)
    state_before = predictor.state_dict()
    from mpts.models import distributions
    real = distributions.binomial_logit_normal
    calls = {"n": 0}

    def fails_mid_update(*args, **kwargs):  # the model's likelihood calls it once per SVI step
        calls["n"] += 1
        if calls["n"] == 3:  # after two SVI steps have already moved the weights
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(distributions, "binomial_logit_normal", fails_mid_update)
    ids = torch.arange(100, 228)
    successes, trials = world.rollout(ids, 2.0)
    with pytest.raises(RuntimeError, match="injected"):
        predictor.observe(ids, successes, trials, 5)
    monkeypatch.setattr(distributions, "binomial_logit_normal", real)
    after = predictor.predict(probe, 5)
    assert torch.equal(before.loc, after.loc) and torch.equal(before.scale, after.scale)
    state_after = predictor.state_dict()["state"]
    assert set(state_after) == set(state_before["state"])
    for key, value in state_before["state"].items():  # weights, Adam moments, rows, z, replay: all as they were
        assert torch.equal(value, state_after[key]), key
    predictor.observe(ids, successes, trials, 5)  # and it still learns afterwards
    assert not torch.equal(before.loc, predictor.predict(probe, 5).loc)


@pytest.mark.parametrize("options", [{"replay_batches": 0}, {"num_hashes": 1, "decay": {"codes": 1.0}}])
def test_other_configurations_learn(options):
    world = World(seed=9)
    predictor = IdentifierVAE(world.pool(), IdentifierVAEOptions(**{**SMALL, **options}), seed=9)
    stream(predictor, world, torch.arange(2000), 15, lambda t: 0.0)
    held_out = torch.arange(2000, 2400)
    rho = spearmanr(predictor.predict(held_out, 15).mean.numpy(), world.p(held_out, 0.0).numpy()).correlation
    assert rho > 0.6, f"held-out Spearman {rho:.3f}"


def test_wide_features_and_noise_outcomes_stay_finite():
    """A 384-wide embedding with outcomes unrelated to anything once made the first updates diverge."""
    g = torch.Generator().manual_seed(10)
    pool = PromptPool(size=5000, features=torch.randn(5000, 384, generator=g))
    predictor = IdentifierVAE(pool, IdentifierVAEOptions(**SMALL), seed=10)
    for step in range(8):
        ids = torch.randperm(5000, generator=g)[:128]
        successes = torch.randint(0, 9, (128,), generator=g).float()
        elbo = predictor.observe(ids, successes, torch.full((128,), 8.0), step)["elbo"]
        assert all(math.isfinite(value) and value < 50 * 128 for value in elbo)
    posterior = predictor.predict(torch.arange(5000), 8)
    assert bool(torch.isfinite(posterior.loc).all() and (posterior.scale < 10).all())


def test_rejected_input_changes_nothing():
    world = World(seed=5)
    predictor = trained(world, steps=3, seed=5)
    probe = torch.arange(50)
    before = predictor.predict(probe, 3)
    with pytest.raises(ValueError, match="successes > trials"):
        predictor.observe(torch.arange(4), torch.tensor([1.0, 9.0, 0.0, 2.0]), torch.full((4,), 8.0), 3)
    with pytest.raises(IndexError, match="unknown prompt id"):
        predictor.predict(torch.tensor([0, 2400]), 3)
    assert torch.equal(before.loc, predictor.predict(probe, 3).loc)


# -- state ------------------------------------------------------------------------------------------
def test_state_round_trip_gives_identical_predictions_and_updates():
    world = World(seed=6)
    predictor = trained(world, steps=6, seed=6)
    buffer = io.BytesIO()
    torch.save(predictor.state_dict(), buffer)  # as a checkpoint would
    buffer.seek(0)
    restored = IdentifierVAE(world.pool(), IdentifierVAEOptions(**SMALL), seed=99)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    probe = torch.arange(0, 2400, 3)
    a, b = predictor.predict(probe, 7), restored.predict(probe, 7)
    assert torch.equal(a.loc, b.loc) and torch.equal(a.scale, b.scale)
    # the optimiser state and the SVI draws came along too: the next update agrees as well
    ids = torch.arange(300, 428)
    successes, trials = world.rollout(ids, 0.0)
    elbo_a = predictor.observe(ids, successes, trials, 7)["elbo"]
    elbo_b = restored.observe(ids, successes, trials, 7)["elbo"]
    assert elbo_a == elbo_b
    a, b = predictor.predict(probe, 8), restored.predict(probe, 8)
    assert torch.equal(a.loc, b.loc) and torch.equal(a.scale, b.scale)


def test_state_from_other_options_is_rejected():
    world = World(seed=7)
    predictor = trained(world, steps=2, seed=7)
    other = IdentifierVAE(world.pool(), IdentifierVAEOptions(**{**SMALL, "latent_dim": 3}))
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict(predictor.state_dict())
    no_features = IdentifierVAE(world.pool(with_features=False), IdentifierVAEOptions(**SMALL))
    with pytest.raises(ValueError, match="keys differ.*trunk"):
        no_features.load_state_dict(predictor.state_dict())


def test_same_seed_same_predictions():
    world_a, world_b = World(seed=8), World(seed=8)
    a, b = trained(world_a, steps=4, seed=8), trained(world_b, steps=4, seed=8)
    probe = torch.arange(0, 2400, 5)
    assert torch.equal(a.predict(probe, 4).loc, b.predict(probe, 4).loc)
