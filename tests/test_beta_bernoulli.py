"""Beta-Bernoulli (MoPPS): closed-form update (its agreement with SVI on the same Pyro program is
in test_programs.py), lazy decay, state round-trip, and rejected inputs that leave the state unchanged."""

import pytest
import torch

from mpts.models import PromptPool
from mpts.models.beta_bernoulli import BetaBernoulli, BetaBernoulliOptions


def make(n=10, **options):
    return BetaBernoulli(PromptPool(n), BetaBernoulliOptions(**options))


def test_mopps_update_by_hand():
    predictor = make(decay=0.5, prior_alpha=1.0, prior_beta=2.0)
    ids = torch.tensor([3, 7])
    predictor.observe(ids, torch.tensor([2.0, 0.0]), torch.tensor([4.0, 4.0]), step=0)
    # alpha <- 0.5*1 + 0.5*1 + 2 = 3 ; beta <- 0.5*2 + 0.5*2 + 2 = 4
    assert predictor.state.alpha[3].item() == pytest.approx(3.0)
    assert predictor.state.beta[3].item() == pytest.approx(4.0)
    predictor.observe(ids, torch.tensor([4.0, 4.0]), torch.tensor([4.0, 4.0]), step=1)
    # alpha <- 0.5*3 + 0.5*1 + 4 = 6 ; beta <- 0.5*4 + 0.5*2 + 0 = 3
    assert predictor.state.alpha[3].item() == pytest.approx(6.0)
    assert predictor.state.beta[3].item() == pytest.approx(3.0)
    untouched = predictor.predict(torch.tensor([0]), step=2)
    assert untouched.mean.item() == pytest.approx(1.0 / 3.0)


@pytest.mark.parametrize("decay_unobserved", [False, True])
def test_prediction_is_the_prior_the_next_update_starts_from(decay_unobserved):
    """After 8/8 at decay 0.9: the next update starts from Beta(0.9 * 9 + 0.1, 1) = Beta(8.2, 1),
    so that is the prediction (MoPPS predicts the undecayed Beta(9, 1))."""
    predictor = make(decay=0.9, decay_unobserved=decay_unobserved)
    ids = torch.tensor([2])
    predictor.observe(ids, torch.tensor([8.0]), torch.tensor([8.0]), step=0)
    posterior = predictor.predict(ids, step=1)
    assert (posterior.alpha.item(), posterior.beta.item()) == pytest.approx((8.2, 1.0))
    assert torch.equal(torch.stack(predictor.decayed_prior(ids, 1)), torch.stack([posterior.alpha, posterior.beta]))
    program = predictor.program(ids, torch.tensor([3.0]), torch.tensor([8.0]), step=1)
    assert torch.equal(program.args[0], posterior.alpha) and torch.equal(program.args[1], posterior.beta)


def test_mopps_exact_predicts_the_undecayed_posterior():
    predictor = make(decay=0.9, mopps_exact=True)
    ids = torch.tensor([2])
    predictor.observe(ids, torch.tensor([8.0]), torch.tensor([8.0]), step=0)
    posterior = predictor.predict(ids, step=1)
    assert (posterior.alpha.item(), posterior.beta.item()) == pytest.approx((9.0, 1.0))
    predictor.observe(ids, torch.tensor([0.0]), torch.tensor([8.0]), step=1)  # the update still decays first
    assert (predictor.state.alpha[2].item(), predictor.state.beta[2].item()) == pytest.approx((8.2, 9.0))


def test_lazy_decay_equals_step_by_step_decay():
    lam, a0, b0 = 0.8, 1.0, 1.0
    predictor = make(4, decay=lam, decay_unobserved=True)
    predictor.observe(torch.tensor([0, 1]), torch.tensor([6.0, 1.0]), torch.tensor([8.0, 8.0]), step=0)
    predictor.observe(torch.tensor([1]), torch.tensor([5.0]), torch.tensor([8.0]), step=4)
    # reference: decay every prompt every step, then add counts of rolled-out prompts
    alpha = torch.full((4,), a0)
    beta = torch.full((4,), b0)
    events = {0: ([0, 1], [6.0, 1.0]), 4: ([1], [5.0])}
    for step in range(8):
        alpha, beta = a0 + lam * (alpha - a0), b0 + lam * (beta - b0)
        if step in events:
            ids, s = events[step]
            alpha[ids] += torch.tensor(s)
            beta[ids] += 8.0 - torch.tensor(s)
        if step == 7:
            break
    # the predictor's view at step 8 includes the decay due at step 8
    alpha, beta = a0 + lam * (alpha - a0), b0 + lam * (beta - b0)
    posterior = predictor.predict(torch.arange(4), step=8)
    assert torch.allclose(posterior.alpha, alpha, atol=1e-5)
    assert torch.allclose(posterior.beta, beta, atol=1e-5)


def test_state_round_trip():
    predictor = make(6, decay_unobserved=True)
    predictor.observe(torch.tensor([1, 4]), torch.tensor([3.0, 8.0]), torch.tensor([8.0, 8.0]), step=2)
    clone = make(6, decay_unobserved=True)
    clone.load_state_dict(predictor.state_dict())
    ids = torch.arange(6)
    assert torch.equal(clone.predict(ids, 5).alpha, predictor.predict(ids, 5).alpha)
    with pytest.raises(ValueError, match="num_prompts|prompts"):
        make(7, decay_unobserved=True).load_state_dict(predictor.state_dict())


@pytest.mark.parametrize("ids, successes, trials, message", [
    ([1, 2], [float("nan"), 1.0], [8.0, 8.0], "successes contains NaN"),
    ([1, 2], [-1.0, 1.0], [8.0, 8.0], "successes contains negative"),
    ([1, 2], [9.0, 1.0], [8.0, 8.0], "successes > trials for prompt id 1"),
    ([1, 2], [0.0, 1.0], [0.0, 8.0], "trials must be >= 1"),
    ([1, 99], [0.0, 1.0], [8.0, 8.0], "unknown prompt id 99"),
    ([-1, 2], [0.0, 1.0], [8.0, 8.0], "unknown prompt id -1"),
    ([2, 2], [0.0, 1.0], [8.0, 8.0], "repeat"),
    ([], [], [], "empty"),
    ([1, 2], [0.5, 1.0], [8.0, 8.0], "whole counts"),
    ([1, 2], [1.0], [8.0, 8.0], "shape"),
])
def test_bad_outcomes_are_rejected_and_leave_state_unchanged(ids, successes, trials, message):
    predictor = make(10)
    predictor.observe(torch.tensor([1, 2]), torch.tensor([3.0, 4.0]), torch.tensor([8.0, 8.0]), step=0)
    before = {key: value.clone() for key, value in predictor.state_dict()["state"].items()}
    with pytest.raises((ValueError, IndexError), match=message):
        predictor.observe(torch.tensor(ids, dtype=torch.long), torch.tensor(successes), torch.tensor(trials), step=1)
    for key, value in predictor.state_dict()["state"].items():
        assert torch.equal(value, before[key])


def test_float_ids_are_a_type_error():
    with pytest.raises(TypeError, match="integers"):
        make().predict(torch.tensor([0.0, 1.0]), 0)


def test_unknown_option_is_an_error():
    with pytest.raises(Exception, match="decay_rate"):
        BetaBernoulliOptions(decay_rate=0.5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_load_rejects_non_finite_state_and_keeps_its_own(bad):
    predictor = make(4)
    state = predictor.state_dict()
    state["state"]["alpha"][1] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        predictor.load_state_dict(state)
    assert torch.equal(predictor.state.alpha, torch.ones(4))
