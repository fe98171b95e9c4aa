"""The Selector: ids as labels, common random numbers across arms, prediction before outcome."""

import dataclasses

import numpy as np
import pytest
import torch

from mpts.models.base import PromptPool, RiskPredictor, Rows
from mpts.models.beta_bernoulli import BetaBernoulli
from mpts.models.posteriors import BetaPosterior
from mpts.training.acquisition import get_acquisition_class
from mpts.training.selector import STREAMS, RandomStreams, Selector

POOL = 200
TRUE_P = torch.linspace(0.02, 0.98, POOL)


def make(rule="thompson_target", seed=0, ids=None, predictor=None):
    predictor = predictor or BetaBernoulli(PromptPool(size=POOL), seed=seed)
    return Selector(predictor, get_acquisition_class(rule)(), k=8, seed=seed, ids=ids)


def outcomes(rows, step):
    """Binomial(8, p) outcomes from a generator of its own, so they depend only on (rows, step)."""
    draws = torch.rand(8, rows.shape[0], generator=torch.Generator().manual_seed(1000 + step))
    return (draws < TRUE_P[rows]).sum(0).float(), torch.full((rows.shape[0],), 8.0)


def play(selector, steps=6, log=False, disturb=False):
    """A small loop; returns the candidates and the chosen rows of every step."""
    history = []
    for step in range(steps):
        candidates = selector.sample_candidates(64, step)
        selection = selector.select(candidates, 16, step)
        successes, trials = outcomes(selection.rows, step)
        if log:
            selector.prediction_columns(selection.posterior, successes, trials, step)
        if disturb:
            torch.rand(1000)  # someone else drawing from the global RNG
        selector.observe(selection.ids, successes, trials, step)
        history.append((np.asarray(candidates).tolist(), selection.rows.tolist()))
    return history


def test_same_seed_same_choices_other_seed_other_choices():
    assert play(make()) == play(make())
    assert play(make()) != play(make(seed=1))


def test_arms_with_different_rules_see_the_same_candidates_at_every_step():
    arms = {rule: play(make(rule)) for rule in ("uniform", "thompson_target", "top_informative", "risk")}
    candidates = {rule: [c for c, _ in history] for rule, history in arms.items()}
    chosen = {rule: [r for _, r in history] for rule, history in arms.items()}
    assert all(c == candidates["uniform"] for c in candidates.values())
    assert chosen["uniform"] != chosen["top_informative"] != chosen["risk"]  # the arms did differ


def test_logging_and_global_rng_use_do_not_perturb_selection():
    assert play(make(), log=True, disturb=True) == play(make())


@dataclasses.dataclass(frozen=True)
class NoisyState:
    alpha: torch.Tensor
    beta: torch.Tensor


class NoisyPredictor(RiskPredictor):
    """Draws from torch's global RNG in observe (as SVI predictors do)."""

    name = "noisy_test_predictor"

    def __init__(self, pool, options=None, seed=0):
        super().__init__(pool, options, seed)
        self.state = NoisyState(torch.ones(pool.size), torch.ones(pool.size))

    def _predict(self, ids, step):
        return BetaPosterior(self.state.alpha[ids], self.state.beta[ids])

    def _observe(self, ids, successes, trials, step):
        jitter = torch.rand(ids.shape[0])
        return {"alpha": Rows(ids, self.state.alpha[ids] + successes + jitter),
                "beta": Rows(ids, self.state.beta[ids] + trials - successes + 1 - jitter)}, {}


def test_predictor_draws_follow_the_predictor_stream_and_leave_the_global_rng_alone():
    def noisy():
        return make("top_informative", predictor=NoisyPredictor(PromptPool(size=POOL)))

    torch.manual_seed(5)
    first = play(noisy())
    after_first = torch.rand(3)
    torch.manual_seed(99)
    assert play(noisy(), disturb=True) == first
    torch.manual_seed(5)
    torch.rand(3)  # untouched global stream: the selector consumed nothing from it
    torch.manual_seed(5)
    assert torch.equal(torch.rand(3), after_first)


def test_string_and_sparse_integer_labels_map_to_rows():
    labels = [f"prompt-{i}" for i in range(POOL)][::-1]
    selector = make("top_informative", ids=labels)
    candidates = selector.sample_candidates(64, 0)
    assert set(candidates) <= set(labels)
    selection = selector.select(candidates, 16, 0)
    assert [labels[r] for r in selection.rows.tolist()] == list(selection.ids)
    assert selection.ids.tolist() == [candidates[p] for p in selection.positions.tolist()]
    sparse = np.arange(POOL) * 1000 - 7
    rows = make(ids=sparse).rows(np.array([-7, 198_993, 5_993]))
    assert rows.tolist() == [0, 199, 6]


def test_selection_carries_the_prediction_made_before_the_outcome():
    selector = make("top_informative")
    candidates = selector.sample_candidates(64, 0)
    before = selector.predict(candidates, 0)
    selection = selector.select(candidates, 16, 0)
    assert torch.equal(selection.posterior.mean, before.mean[selection.positions])
    successes, trials = outcomes(selection.rows, 0)
    selector.observe(selection.ids, successes, trials, 0)
    assert torch.equal(selection.posterior.mean, before.mean[selection.positions])  # not mutated
    assert not torch.equal(selector.predict(selection.ids, 1).mean, selection.posterior.mean)


@pytest.mark.parametrize("bad, error, text", [
    (["nope"], IndexError, "unknown prompt id 'nope'"),
    ([3, 4], TypeError, "dtype"),
    ([], ValueError, "non-empty"),
])
def test_unknown_or_malformed_labels_give_one_line_errors(bad, error, text):
    selector = make(ids=[f"p{i}" for i in range(POOL)])
    before = selector.state_dict()["predictor"]["state"]
    with pytest.raises(error, match=text) as caught:
        selector.observe(bad, torch.ones(len(bad)), torch.full((len(bad),), 8.0), 0)
    assert "\n" not in str(caught.value)
    after = selector.state_dict()["predictor"]["state"]
    assert all(torch.equal(before[key], after[key]) for key in before)


def test_unknown_row_and_bad_label_lists_are_refused():
    with pytest.raises(IndexError, match=f"unknown prompt id {POOL}"):
        make().select(torch.tensor([0, POOL]), 1, 0)
    with pytest.raises(ValueError, match="'a' appears more than once"):
        make(ids=["a"] + ["a"] + [f"p{i}" for i in range(POOL - 2)])
    with pytest.raises(ValueError, match=f"{POOL} labels"):
        make(ids=["a", "b"])


def test_oracle_ranks_on_truth_and_refuses_without_it():
    selector = make("oracle")
    candidates = selector.sample_candidates(64, 0)
    truth = TRUE_P[candidates]
    chosen = selector.select(candidates, 8, 0, truth=truth).rows
    assert ((TRUE_P[chosen] - 0.5).abs().max() <= (truth - 0.5).abs().sort().values[7] + 1e-6)
    with pytest.raises(ValueError, match="needs the true success probabilities"):
        selector.select(candidates, 8, 0)


def test_dynamic_sampling_orders_every_candidate():
    selector = make("dynamic_sampling")
    candidates = selector.sample_candidates(64, 0)
    selection = selector.select(candidates, 16, 0)
    assert sorted(selection.rows.tolist()) == sorted(candidates.tolist())


def test_state_round_trip_continues_the_same_run_and_refuses_another_setup():
    whole = play(make(), steps=6)
    first = make()
    play(first, steps=3)
    second = make()
    second.load_state_dict(first.state_dict())
    rest = [h for h in play_from(second, 3, 6)]
    assert whole[3:] == rest
    with pytest.raises(ValueError, match="seed 0"):
        make(seed=1).load_state_dict(first.state_dict())
    with pytest.raises(ValueError, match="rule 'thompson_target'"):
        make("uniform").load_state_dict(first.state_dict())


def play_from(selector, start, stop):
    for step in range(start, stop):
        candidates = selector.sample_candidates(64, step)
        selection = selector.select(candidates, 16, step)
        selector.observe(selection.ids, *outcomes(selection.rows, step), step)
        yield candidates.tolist(), selection.rows.tolist()


def test_streams_are_distinct_per_stream_step_and_seed():
    streams = RandomStreams(3)
    seeds = {(s, t): streams.seed_for(s, t) for s in STREAMS for t in range(50)}
    assert len(set(seeds.values())) == len(seeds)
    assert RandomStreams(4).seed_for("candidates", 0) != seeds[("candidates", 0)]
    assert all(0 <= v < 2**63 for v in seeds.values())
    with pytest.raises(KeyError, match="unknown random stream 'noise'"):
        streams.generator("noise", 0)
