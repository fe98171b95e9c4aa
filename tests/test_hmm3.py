"""Three-state HMM (DPS): the update by hand, lazy catch-up against a step-by-step sweep, the
closed-form filter against the Pyro program (DiscreteHMM, enumeration, SVI), the mixture
predictive, calibration on data drawn from the model, pooling, state round-trip, bad inputs."""

import math

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO, TraceMeanField_ELBO
from scipy import stats

from mpts.inference import StreamingSVI
from mpts.models import PromptPool
from mpts.models.hmm3 import (WAITED, ThreeStateHMM, ThreeStateHMMOptions, ThreeStateMixturePosterior, Guide,
                              model, outcome_likelihood, propagate, row_normalise, soft_counts, state_chain,
                              transition_model)
from mpts.models.registry import get_predictor_class

K = 8


def make(n=10, clusters=None, **options):
    return ThreeStateHMM(PromptPool(n, clusters=clusters), ThreeStateHMMOptions(**options))


def counts_for(states, k=K):
    """A success count that lands in each state (partial: a random 1..k-1)."""
    states = torch.as_tensor(states)
    middle = torch.randint(1, k, states.shape)
    return torch.where(states == 0, 0, torch.where(states == 2, k, middle)).float()


def observe_states(predictor, ids, states, step, k=K):
    ids = torch.as_tensor(ids)
    predictor.observe(ids, counts_for(states, k), torch.full((ids.shape[0],), float(k)), step)


def test_registered_under_its_name():
    assert get_predictor_class("hmm3") is ThreeStateHMM


def test_dps_update_by_hand():
    predictor = make(4, decay=0.5, initial_belief=(1 / 3, 1 / 3, 1 / 3))
    observe_states(predictor, [2], [1], step=0)
    # first rollout: previous state ~ uniform, E[P] uniform -> xi puts 1/3 in column 1 of each row
    expected = torch.zeros(3, 3)
    expected[:, 1] = 1 / 3
    assert torch.allclose(predictor.state.excess[2], expected)
    w = predictor.predict(torch.tensor([2]), step=1).state_probs[0]
    # row 1 of alpha_0 = (1, 4/3, 1) -> (0.3, 0.4, 0.3)
    assert torch.allclose(w, torch.tensor([0.3, 0.4, 0.3]))
    observe_states(predictor, [2], [2], step=1)
    # previous state known (1): xi = one count 1 -> 2;  E <- 0.5 E + xi
    expected = 0.5 * expected
    expected[1, 2] += 1.0
    assert torch.allclose(predictor.state.excess[2], expected)
    # two waited steps: alpha = 1 + 0.25 E for the third step's transition
    row2 = torch.tensor([1.0, 1.0, 1.0]) + 0.5 ** 0 * expected[2]
    after_one = row2 / row2.sum()
    alpha = 1.0 + 0.5 * expected
    w = predictor.predict(torch.tensor([2]), step=3).state_probs[0]
    assert torch.allclose(w, after_one @ row_normalise(alpha), atol=1e-6)
    # a prompt never rolled out keeps the initial belief
    assert torch.allclose(predictor.predict(torch.tensor([0]), step=3).state_probs[0], torch.full((3,), 1 / 3))


def dense_dps_reference(num_prompts, lam, alpha0, initial, events, num_steps):
    """The DPS sweep over every prompt every step (float64), the definition the lazy path must equal.

    Returns the predicted state distribution of every prompt at every step (before its outcome).
    """
    alpha = np.tile(alpha0, (num_prompts, 1, 1))
    belief = np.tile(initial, (num_prompts, 1))
    seen = np.zeros(num_prompts, dtype=bool)
    predictions = []
    for step in range(num_steps):
        transition = alpha / alpha.sum(-1, keepdims=True)
        moved = np.einsum("ni,nij->nj", belief, transition)
        moved[~seen] = belief[~seen]
        predictions.append(moved.copy())
        new_alpha = lam * alpha + (1 - lam) * alpha0
        for i, state in zip(*events.get(step, ([], []))):
            column = belief[i] * transition[i, :, state]
            new_alpha[i, :, state] += column / column.sum()
            moved[i] = np.eye(3)[state]
            seen[i] = True
        alpha, belief = new_alpha, moved
    return np.stack(predictions)


@pytest.mark.parametrize("lam", [0.0, 0.5, 0.7, 1.0])
def test_lazy_catch_up_equals_the_step_by_step_update(lam):
    rng = np.random.default_rng(int(lam * 10))
    n, num_steps = 12, 160
    alpha0 = rng.uniform(0.5, 2.0, size=(3, 3))
    initial = (0.2, 0.5, 0.3)
    # bursts of rollouts, then long waits (longer than the exact part of the recurrence)
    events = {}
    for step in range(num_steps):
        rate = 0.4 if step % 60 < 8 else 0.02
        ids = np.nonzero(rng.random(n) < rate)[0]
        if len(ids):
            events[step] = (ids, rng.integers(0, 3, len(ids)))
    reference = dense_dps_reference(n, lam, alpha0, np.array(initial), events, num_steps)
    predictor = make(n, decay=lam, prior_alpha=alpha0.tolist(), initial_belief=initial)
    worst = 0.0
    for step in range(num_steps):
        if step % 3 == 0 or step in events:  # a prompt is only looked at now and then
            got = predictor.predict(torch.arange(n), step).state_probs.double().numpy()
            worst = max(worst, np.abs(got - reference[step]).max())
        if step in events:
            ids, states = events[step]
            observe_states(predictor, ids, states, step)
    assert worst < 2e-6


@pytest.mark.parametrize("pooling", ["none", "global"])
def test_predict_is_pure_observe_after_predict_is_the_same_update(pooling):
    torch.manual_seed(11)
    with_predict, without = make(40, pooling=pooling), make(40, pooling=pooling)
    for step in (0, 3, 9, 60, 61, 200):
        candidates = torch.randperm(40)[:20]
        chosen = candidates[:8]
        states = torch.randint(0, 3, (8,))
        before = {key: value.clone() for key, value in with_predict.state_dict()["state"].items()}
        with_predict.predict(candidates, step)
        for key, value in with_predict.state_dict()["state"].items():
            assert torch.equal(value, before[key]), key
        for predictor in (with_predict, without):
            torch.manual_seed(step)
            observe_states(predictor, chosen, states, step)
    for key, value in with_predict.state_dict()["state"].items():
        assert torch.allclose(value.double(), without.state_dict()["state"][key].double(), atol=1e-6), key


def naive_propagate(belief, prior, excess, lam, steps):
    out = belief.clone().double()
    for i in range(belief.shape[0]):
        for d in range(int(steps[i])):
            out[i] = out[i] @ row_normalise(prior[i].double() + lam ** d * excess[i].double())
    return out


@pytest.mark.parametrize("lam", [0.3, 0.8, 1.0])
def test_propagate_matches_a_step_by_step_loop_with_per_prompt_priors(lam):
    generator = torch.Generator().manual_seed(1)
    n = 16
    belief = torch.distributions.Dirichlet(torch.ones(3)).sample((n,))
    prior = 3.0 * torch.distributions.Dirichlet(torch.ones(3)).sample((n, 3))  # pooled priors differ by prompt
    excess = torch.rand(n, 3, 3, generator=generator) * 4.0
    steps = torch.tensor([0, 1, 2, 3, 5, 8, 13, 40, 70, 100, 150, 233, 300, 1, 0, 64])
    got = propagate(belief, prior, excess, lam, steps)
    assert torch.allclose(got.double(), naive_propagate(belief, prior, excess, lam, steps), atol=2e-6)


def test_closed_form_filter_agrees_with_discrete_hmm():
    """Same data, same per-step matrices: DiscreteHMM's log_prob and filter equal the fast path."""
    torch.manual_seed(3)
    n, num_steps, rho = 6, 40, 0.5
    predictor = make(n, decay=0.7)
    ids = torch.arange(n)
    first = torch.randint(0, 3, (n,))
    observe_states(predictor, ids, first, step=0)
    rolled = torch.rand(n, num_steps) < 0.3
    rolled[:, -10:] = False  # trailing waits: the filter must propagate through them
    observations = torch.full((n, num_steps), WAITED)
    matrices, log_predictive = [], torch.zeros(n)
    for t in range(1, num_steps + 1):
        matrices.append(row_normalise(predictor.transition_concentration(ids, t - 1)))
        w = predictor.predict(ids, t).state_probs
        chosen = torch.nonzero(rolled[:, t - 1]).squeeze(1)
        if chosen.numel():
            states = torch.randint(0, 3, (chosen.numel(),))
            observations[chosen, t - 1] = states
            log_predictive[chosen] += w[chosen, states].log()
            observe_states(predictor, chosen, states, t)
    transitions = torch.stack(matrices, dim=1)  # [n, T, 3, 3]
    hmm = state_chain(torch.nn.functional.one_hot(first, 3).float(), transitions, num_steps, rho)
    rolled_count = rolled.sum(1).float()
    expected = log_predictive + rolled_count * math.log(rho) + (num_steps - rolled_count) * math.log(1 - rho)
    assert torch.allclose(hmm.log_prob(observations), expected, atol=1e-4)
    final = hmm.filter(observations).probs  # state at the last step
    next_matrix = row_normalise(predictor.transition_concentration(ids, num_steps))
    predicted = torch.bmm(final.unsqueeze(1), next_matrix).squeeze(1)
    assert torch.allclose(predictor.predict(ids, num_steps + 1).state_probs, predicted, atol=1e-5)


def test_soft_counts_are_the_enumerated_posterior_of_the_previous_state():
    torch.manual_seed(4)
    n = 5
    previous = torch.distributions.Dirichlet(torch.ones(3)).sample((n,))
    concentration = torch.rand(n, 3, 3) * 3 + 0.5
    states = torch.randint(0, 3, (n,))
    expected_transition = row_normalise(concentration)
    xi, predictive = soft_counts(previous, expected_transition, torch.nn.functional.one_hot(states, 3).float())
    conditioned = poutine.condition(transition_model, data={"transition": expected_transition})
    marginals = TraceEnum_ELBO(max_plate_nesting=1).compute_marginals(
        conditioned, lambda *args: None, previous, concentration, states)
    enumerated = marginals["previous_state"].log_prob(torch.arange(3).view(3, 1)).exp().T  # [n, 3]
    assert torch.allclose(xi.sum(-1), enumerated, atol=1e-6)
    assert torch.allclose(xi.sum((-1, -2)), torch.ones(n))
    assert torch.allclose(predictive, torch.bmm(previous.unsqueeze(1), expected_transition).squeeze(1))


def test_outcome_likelihood_is_the_predictives_own_emission():
    """posterior reading: P(s | state) = [s = 0, Beta-Binomial(k, a, b), s = k] up to a factor per
    prompt; bucket reading: one-hot of the bucket."""
    successes, trials, a, b = torch.tensor([0.0, 3.0, 8.0, 0.0, 1.0]), torch.tensor([8.0, 8.0, 8.0, 1.0, 1.0]), 1.7, 2.9
    for batch in (slice(None), slice(0, 3)):  # trials that differ, and one k for the batch
        likelihood = outcome_likelihood(successes[batch], trials[batch], a, b, "posterior").double()
        partial = torch.from_numpy(stats.betabinom.pmf(successes[batch].numpy(), trials[batch].numpy(), a, b))
        expected = torch.stack([(successes[batch] == 0).double(), partial, (successes[batch] == trials[batch]).double()], -1)
        torch.testing.assert_close(likelihood, expected / expected.amax(-1, keepdim=True), rtol=1e-5, atol=1e-7)
    bucket = outcome_likelihood(successes, trials, a, b, "bucket")
    assert bucket.argmax(-1).tolist() == [0, 1, 2, 0, 2] and bucket.sum(-1).eq(1).all()


def test_soft_counts_with_an_outcome_likelihood_are_the_enumerated_posterior_of_both_states():
    """With the current state latent (posterior reading), xi's margins are Pyro's enumerated
    marginals of the previous and the current state in `transition_model`."""
    torch.manual_seed(6)
    n = 6
    previous = torch.distributions.Dirichlet(torch.ones(3)).sample((n,))
    concentration = torch.rand(n, 3, 3) * 3 + 0.5
    successes, trials = torch.tensor([0.0, 0.0, 4.0, 8.0, 8.0, 1.0]), torch.full((n,), 8.0)
    likelihood = outcome_likelihood(successes, trials, 0.8, 1.2, "posterior")
    expected_transition = row_normalise(concentration)
    xi, _ = soft_counts(previous, expected_transition, likelihood)
    conditioned = poutine.condition(transition_model, data={"transition": expected_transition})
    marginals = TraceEnum_ELBO(max_plate_nesting=1).compute_marginals(
        conditioned, lambda *args: None, previous, concentration, None, likelihood)
    support = torch.arange(3).view(3, 1)
    assert torch.allclose(xi.sum(-1), marginals["previous_state"].log_prob(support).exp().T, atol=1e-5)
    assert torch.allclose(xi.sum(-2), marginals["state"].log_prob(support).exp().T, atol=1e-5)
    assert 0.0 < float(xi.sum(-2)[0, 1]) < 1.0  # s = 0 leaves the partial state possible


def test_dirichlet_update_is_the_exact_posterior_when_the_previous_state_is_known():
    """log p(P, y) from the Pyro program minus log Dir(P | alpha + xi) is the same for every P."""
    torch.manual_seed(5)
    concentration = torch.rand(1, 3, 3) * 2 + 0.5
    previous = torch.tensor([[0.0, 1.0, 0.0]])
    state = torch.tensor([2])
    xi, _ = soft_counts(previous, row_normalise(concentration), torch.nn.functional.one_hot(state, 3).float())
    gaps = []
    for draw in torch.distributions.Dirichlet(concentration).sample((6,)):
        conditioned = poutine.condition(transition_model, data={"transition": draw})
        log_joint = -TraceEnum_ELBO(max_plate_nesting=1).loss(
            conditioned, lambda *args: None, previous, concentration, state)
        log_posterior = torch.distributions.Dirichlet(concentration + xi).log_prob(draw).sum()
        gaps.append(float(log_joint - log_posterior))
    assert max(gaps) - min(gaps) < 1e-4
    # and the evidence is E[P[1, 2]], the predictive probability of the observed state
    assert gaps[0] == pytest.approx(math.log(float(row_normalise(concentration)[0, 1, 2])), abs=1e-4)


def test_svi_on_the_pyro_program_agrees_with_the_exact_update():
    """No decay, every step rolled out: the streaming counts are the exact Dirichlet posterior."""
    torch.manual_seed(6)
    pyro.set_rng_seed(6)
    n, num_steps = 3, 12
    predictor = make(n, decay=1.0)
    ids = torch.arange(n)
    first = torch.tensor([0, 1, 2])
    observe_states(predictor, ids, first, step=0)
    prior = predictor.transition_concentration(ids, 0)
    truth = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7]])
    states, current = [], first
    for t in range(1, num_steps + 1):
        current = torch.multinomial(truth[current], 1).squeeze(1)
        states.append(current)
        observe_states(predictor, ids, current, t)
    observations = torch.stack(states, 1)
    exact = predictor.transition_concentration(ids, num_steps)
    counts = torch.zeros(n, 3, 3)
    path = torch.cat([first.unsqueeze(1), observations], 1)
    for i in range(n):
        for a, b in zip(path[i, :-1], path[i, 1:]):
            counts[i, a, b] += 1
    assert torch.allclose(exact, prior + counts, atol=1e-5)
    guide = Guide(prior)
    engine = StreamingSVI(model, guide, steps=250, lr=0.15, lr_decay=0.985,
                          loss=TraceMeanField_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=1))
    with pyro.validation_enabled(False):  # argument checks cost more than the tiny model itself
        fitted, info = engine.update(engine.init(), torch.nn.functional.one_hot(first, 3).float(), prior,
                                     observations, 1.0, seed=6)
    assert "failed" not in info
    svi_mean = row_normalise(guide.q_concentration.detach())
    assert (svi_mean - row_normalise(exact)).abs().max().item() < 0.03


def mixture(w, a=1.5, b=2.5):
    return ThreeStateMixturePosterior(torch.as_tensor(w, dtype=torch.float32), a, b)


def test_mixture_predictive_is_a_pmf_of_the_three_rate_states():
    posterior = mixture([[0.2, 0.5, 0.3], [0.0, 1.0, 0.0], [0.9, 0.05, 0.05]])
    for n in (1, 2, 5, 8, 16):
        trials = torch.full((3,), float(n))
        grid = torch.arange(n + 1, dtype=torch.float32).unsqueeze(1).expand(n + 1, 3)
        pmf = posterior.log_prob_grid(grid, trials).exp()
        assert torch.allclose(pmf.sum(0), torch.ones(3), atol=1e-6)
        bb = torch.from_numpy(stats.betabinom(n, 1.5, 2.5).pmf(np.arange(n + 1))).float().unsqueeze(1)
        w = posterior.state_probs
        expected = w[:, 1] * bb
        expected[0] += w[:, 0]
        expected[-1] += w[:, 2]
        assert torch.allclose(pmf, expected, atol=1e-6)
        assert torch.allclose(posterior.p_informative(n), (1 - pmf[0] - pmf[-1]).clamp(0, 1), atol=1e-6)


def test_mixture_rate_summaries_match_its_samples_and_its_pmf():
    posterior = mixture([[0.2, 0.5, 0.3], [0.7, 0.2, 0.1], [0.05, 0.05, 0.9]], a=0.8, b=1.3)
    draws = posterior.sample(200000, torch.Generator().manual_seed(0))
    assert torch.equal(draws[:10], posterior.sample(200000, torch.Generator().manual_seed(0))[:10])
    assert torch.allclose(posterior.mean, draws.mean(0), atol=3e-3)
    assert torch.allclose(posterior.variance, draws.var(0), atol=3e-3)
    lo, hi = posterior.interval(0.5)  # quantiles of a law with atoms at 0 and 1: P(X < q) <= tail <= P(X <= q)
    for q, tail in ((lo, 0.25), (hi, 0.75)):
        assert ((draws < q).float().mean(0) <= tail + 4e-3).all() and ((draws <= q).float().mean(0) >= tail - 4e-3).all()
    assert torch.allclose(hi, torch.tensor([1.0, float(posterior.interval(0.5)[1][1]), 1.0]))
    # the mean is E[S] / K of the count pmf, for any K
    for k in (2, K):
        pmf = posterior.log_prob_grid(torch.arange(k + 1.0).unsqueeze(1).expand(k + 1, 3), torch.full((3,), float(k))).exp()
        assert torch.allclose(posterior.mean, (pmf * torch.arange(k + 1.0).unsqueeze(1)).sum(0) / k, atol=1e-6)


def test_a_belief_certain_of_unsolved_predicts_p_zero_everywhere():
    posterior = mixture([[1.0, 0.0, 0.0]])
    assert float(posterior.mean) == 0.0 and float(posterior.variance) == 0.0
    assert float(posterior.log_prob(torch.zeros(1), torch.full((1,), 8.0))) == 0.0
    assert posterior.sample(100, torch.Generator().manual_seed(0)).eq(0).all()
    assert [float(x) for x in posterior.interval(0.9)] == [0.0, 0.0]


def test_pit_is_uniform_for_counts_drawn_from_the_predictive():
    generator = torch.Generator().manual_seed(2)
    n = 30000
    w = torch.distributions.Dirichlet(torch.ones(3)).sample((n,))
    posterior = mixture(w, a=0.7, b=1.4)
    grid = torch.arange(K + 1, dtype=torch.float32).unsqueeze(1).expand(K + 1, n)
    pmf = posterior.log_prob_grid(grid, torch.full((n,), float(K))).exp()
    successes = torch.multinomial(pmf.T, 1, generator=generator).squeeze(1).float()
    pit = posterior.predictive_pit(successes, torch.full((n,), float(K)), generator)
    histogram = torch.histc(pit, bins=10, min=0, max=1) / n
    assert (histogram - 0.1).abs().max().item() < 0.012


def simulate_chains(num_prompts, num_steps, rollout_prob, transitions, generator):
    """States from the model: x_{-1} uniform, x_t ~ P[x_{t-1}]; which steps are rolled out."""
    state = torch.randint(0, 3, (num_prompts,), generator=generator)
    path = []
    for _ in range(num_steps):
        state = torch.multinomial(transitions[torch.arange(num_prompts), state], 1, generator=generator).squeeze(1)
        path.append(state)
    rolled = torch.rand(num_prompts, num_steps, generator=generator) < rollout_prob
    rolled[:, 0] = True
    return torch.stack(path, 1), rolled


@pytest.mark.parametrize("rollout_prob", [1.0, 0.4])
def test_one_step_predictions_are_calibrated_on_chains_drawn_from_the_prior(rollout_prob):
    """Simulation-based check: P_i ~ Dir(1) rows, chains, the filter's predictive P(state)."""
    torch.manual_seed(7)
    generator = torch.Generator().manual_seed(7)
    n, num_steps = 3000, 12
    transitions = torch.distributions.Dirichlet(torch.ones(3)).sample((n, 3))
    path, rolled = simulate_chains(n, num_steps, rollout_prob, transitions, generator)
    predictor = make(n, decay=1.0, initial_belief=(1 / 3, 1 / 3, 1 / 3))
    predicted, observed = [], []
    for t in range(num_steps):
        ids = torch.nonzero(rolled[:, t]).squeeze(1)
        predicted.append(predictor.predict(ids, t).state_probs)
        observed.append(path[ids, t])
        observe_states(predictor, ids, path[ids, t], t)
    predicted, observed = torch.cat(predicted), torch.cat(observed)
    hits = torch.nn.functional.one_hot(observed, 3).float()
    standard_error = (predicted * (1 - predicted)).sum(0).sqrt() / predicted.shape[0]
    assert torch.all((predicted.mean(0) - hits.mean(0)).abs() < 4 * standard_error)
    # reliability of P(partial) in bins of predicted probability
    partial, bins = predicted[:, 1], torch.linspace(0, 1, 6)
    for lo, hi in zip(bins[:-1], bins[1:]):
        inside = (partial >= lo) & (partial < hi)
        if inside.sum() >= 300:
            p = partial[inside]
            error = (p * (1 - p)).sum().sqrt() / inside.sum()
            assert abs(p.mean() - hits[inside, 1].mean()) < 4 * error + 0.01


def test_pooled_counts_recover_shared_dynamics_when_data_per_prompt_is_scarce():
    generator = torch.Generator().manual_seed(8)
    n, num_steps = 1200, 3
    clusters = torch.arange(n) % 2
    truth = torch.tensor([[[0.7, 0.25, 0.05], [0.2, 0.6, 0.2], [0.05, 0.25, 0.7]],
                          [[0.2, 0.7, 0.1], [0.1, 0.3, 0.6], [0.05, 0.15, 0.8]]])
    transitions = truth[clusters]
    path, rolled = simulate_chains(n, num_steps, 1.0, transitions, generator)
    results = {}
    for pooling in ("none", "global", "cluster"):
        torch.manual_seed(8)
        predictor = make(n, clusters=clusters, decay=1.0, pooling=pooling)
        log_score = 0.0
        for t in range(num_steps):
            ids = torch.arange(n)
            if t > 0:
                log_score += predictor.predict(ids, t).state_probs.gather(1, path[:, t:t + 1]).log().sum().item()
            observe_states(predictor, ids, path[:, t], t)
        estimate = row_normalise(predictor.transition_concentration(torch.arange(n), num_steps - 1))
        results[pooling] = ((estimate - transitions).abs().sum(-1).mean().item(), log_score / (n * (num_steps - 1)))
    error = {name: value[0] for name, value in results.items()}
    score = {name: value[1] for name, value in results.items()}
    assert error["cluster"] < error["global"] < error["none"]
    assert score["cluster"] > score["global"] > score["none"]
    assert error["cluster"] < 0.6 * error["none"]


def test_fitted_rate_beta_and_initial_belief_follow_the_observations():
    torch.manual_seed(9)
    n = 20000
    predictor = make(n, decay={"fits": 1.0})
    rates = torch.distributions.Beta(2.0, 5.0).sample((n,))
    trials = torch.full((n,), float(K))
    successes = torch.binomial(trials, rates)
    predictor.observe(torch.arange(n), successes, trials, step=0)
    a, b = predictor.rate_beta()
    # fitted to the partially solved groups only, with their cut-off ends accounted for: the
    # Beta(2, 5) that made them, not the narrower Beta their s/K alone would suggest
    assert a == pytest.approx(2.0, rel=0.1) and b == pytest.approx(5.0, rel=0.1)
    first = torch.bincount(torch.where(successes == 0, 0, torch.where(successes == K, 2, 1)), minlength=3) / n
    assert torch.allclose(predictor.initial_belief(), first.float(), atol=1e-3)


def test_pooled_prompt_seen_once_borrows_its_cluster_dynamics():
    clusters = torch.tensor([0] * 50 + [1] * 50 + [0])
    predictor = make(101, clusters=clusters, pooling="cluster", decay={"transitions": 0.9, "pool": 1.0})
    ids = torch.arange(50)
    for t in range(6):  # cluster 0 stays solved
        observe_states(predictor, ids, torch.full((50,), 2), t)
    observe_states(predictor, [100], [2], step=6)
    w = predictor.predict(torch.tensor([100]), step=7).state_probs[0]
    assert w[2] > 0.9
    alone = make(101, decay=0.9)
    observe_states(alone, [100], [2], step=6)
    assert alone.predict(torch.tensor([100]), step=7).state_probs[0, 2] < 0.5


@pytest.mark.parametrize("pooling", ["none", "cluster"])
def test_state_round_trip(pooling):
    clusters = torch.arange(8) % 3
    predictor = make(8, clusters=clusters, pooling=pooling)
    observe_states(predictor, [1, 4, 6], [0, 1, 2], step=2)
    observe_states(predictor, [4], [2], step=5)
    clone = make(8, clusters=clusters, pooling=pooling)
    clone.load_state_dict(predictor.state_dict())
    ids = torch.arange(8)
    a, b = predictor.predict(ids, 9), clone.predict(ids, 9)
    assert torch.equal(a.state_probs, b.state_probs) and (a.a, a.b) == (b.a, b.b)
    with pytest.raises(ValueError, match="keys"):
        make(8, clusters=clusters, pooling="global" if pooling == "none" else "none").load_state_dict(
            predictor.state_dict())
    with pytest.raises(ValueError, match="prompts"):
        make(9, clusters=torch.arange(9) % 3, pooling=pooling).load_state_dict(predictor.state_dict())


@pytest.mark.parametrize("ids, successes, trials, step, message", [
    ([1, 2], [9.0, 1.0], [8.0, 8.0], 3, "successes > trials for prompt id 1"),
    ([1, 99], [0.0, 1.0], [8.0, 8.0], 3, "unknown prompt id 99"),
    ([5, 2], [0.0, 1.0], [8.0, 8.0], 1, "prompt id 2 .*steps must increase"),
    ([5], [0.0], [8.0], 2**31, "int32"),
])
def test_bad_inputs_are_rejected_and_leave_state_unchanged(ids, successes, trials, step, message):
    predictor = make(10, pooling="global")
    observe_states(predictor, [1, 2], [1, 2], step=1)
    before = {key: value.clone() for key, value in predictor.state_dict()["state"].items()}
    with pytest.raises((ValueError, IndexError), match=message):
        predictor.observe(torch.tensor(ids), torch.tensor(successes), torch.tensor(trials), step)
    for key, value in predictor.state_dict()["state"].items():
        assert torch.equal(value, before[key]), key


def test_options_are_validated():
    with pytest.raises(Exception, match="decay_rate"):
        ThreeStateHMMOptions(decay_rate=0.5)
    with pytest.raises(Exception, match="3x3"):
        ThreeStateHMMOptions(prior_alpha=[[1.0, 1.0], [1.0, 1.0]])
    with pytest.raises(Exception, match="> 0"):
        ThreeStateHMMOptions(prior_alpha=[[1.0, 0.0, 1.0]] * 3)
    with pytest.raises(Exception, match="summing to 1"):
        ThreeStateHMMOptions(initial_belief=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="pool.clusters"):
        make(4, pooling="cluster")


def test_pooled_variant_is_registered_under_its_own_name():
    from mpts.models import get_predictor_class
    cls = get_predictor_class("hmm3_pooled")
    assert cls.name == "hmm3_pooled" and cls.Options().pooling == "cluster"
    assert get_predictor_class("hmm3").Options().pooling == "none"
