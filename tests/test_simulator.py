"""The simulated learner: determinism, recovery of true p, the learning rule, non-stationarity."""

import io
import math

import pytest
import torch
from pydantic import ValidationError

from mpts.training.environments.base import Outcomes, get_environment_class
from mpts.training.environments.simulator import SimulatedLearner, SimulatorOptions


def make(seed=0, **options):
    return SimulatedLearner(SimulatorOptions(**options), seed=seed)


def groups(env, ids, successes, k=8, failed=None):
    ids = torch.as_tensor(ids)
    return Outcomes(ids=ids, successes=torch.as_tensor(successes, dtype=torch.float32),
                    trials=torch.full((ids.shape[0],), float(k)), failed=failed)


def ids_in_cluster(env, cluster, n):
    return torch.nonzero(env.clusters == cluster).squeeze(1)[:n]


def drive(env, steps, batch=32, k=8, seed=1):
    """A uniform-selection loop; returns everything it saw."""
    g = torch.Generator().manual_seed(seed)
    seen = []
    for _ in range(steps):
        ids = torch.randperm(env.pool.size, generator=g)[:batch]
        out = env.rollout(ids, k)
        diag = env.train_on(out)
        seen.append((out.ids, out.successes, out.true_p, diag["signal"], env.evaluate()))
    return seen


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            if isinstance(u, torch.Tensor):
                assert torch.equal(u, v)
            else:
                assert u == v


def test_registered_as_sim_and_options_forbid_unknown_keys():
    assert get_environment_class("sim") is SimulatedLearner
    with pytest.raises(ValidationError, match="num_promts"):
        SimulatorOptions(num_promts=10)
    with pytest.raises(ValidationError, match="jump_size"):
        SimulatorOptions(jump_step=5)
    for name, field in SimulatorOptions.model_fields.items():
        assert field.description, f"option {name} is undocumented"


def test_same_seed_same_world_and_draws_other_seed_differs():
    a, b, c = make(seed=3), make(seed=3), make(seed=4)
    assert torch.equal(a.difficulty, b.difficulty) and torch.equal(a.pool.features, b.pool.features)
    assert not torch.equal(a.difficulty, c.difficulty)
    assert_same(drive(a, 10), drive(b, 10))
    ids = torch.arange(200)
    assert not torch.equal(make(seed=3).rollout(ids, 8).successes, make(seed=4).rollout(ids, 8).successes)


def test_state_dict_round_trip_resumes_identically_through_torch_save():
    env = make(seed=7)
    drive(env, 5)
    buffer = io.BytesIO()
    torch.save(env.state_dict(), buffer)
    expected = drive(env, 6, seed=9)

    resumed = make(seed=7)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert_same(drive(resumed, 6, seed=9), expected)


def test_load_state_dict_rejects_other_world_and_leaves_state_unchanged():
    env = make(seed=1)
    drive(env, 3)
    before = env.competence.clone()
    with pytest.raises(ValueError, match="different seed or options"):
        env.load_state_dict(make(seed=2).state_dict())
    with pytest.raises(ValueError, match="different seed or options"):
        env.load_state_dict(make(seed=1, num_prompts=100).state_dict())
    assert torch.equal(env.competence, before)


def test_a_state_saved_before_an_option_existed_loads_with_its_default():
    """`ceiling` and `cluster_difficulties` came after runs were saved: their defaults are the old
    behaviour, so an older state resumes; a non-default value is another world and is refused."""
    env = make(seed=1)
    drive(env, 3)
    state = env.state_dict()
    for added in ("ceiling", "cluster_difficulties"):
        del state["options"][added]
    resumed = make(seed=1)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.competence, env.competence)
    with pytest.raises(ValueError, match="different seed or options"):
        make(seed=1, ceiling=0.9).load_state_dict(state)


def test_empirical_success_rates_recover_true_p():
    env = make(seed=0)
    ids = torch.arange(300)
    k = 4000
    out = env.rollout(ids, k)
    p = env.true_success(ids)
    assert torch.equal(out.true_p, p)
    assert torch.equal(out.trials, torch.full((300,), float(k)))
    z = (out.successes / k - p) / torch.sqrt(p * (1 - p) / k).clamp_min(1e-4)
    assert z.abs().max() < 5.0
    assert abs(float(z.mean())) < 4.0 / math.sqrt(300)  # unbiased overall
    # Many small groups: the count of all-0 groups matches (1 - p)^k.
    rep = ids.repeat(40)
    zeros = (env.rollout(rep, 8).successes == 0).float().view(40, 300).mean(0)
    assert torch.allclose(zeros, (1 - p) ** 8, atol=0.25)
    assert abs(float(zeros.mean() - ((1 - p) ** 8).mean())) < 0.02


def test_true_p_follows_the_model():
    env = make(seed=0, slope=2.0, initial_competence=0.5)
    ids = torch.tensor([0, 5, 17])
    expected = torch.sigmoid(2.0 * (0.5 - env.difficulty[ids]))
    assert torch.allclose(env.true_success(ids), expected)
    held_out = torch.sigmoid(2.0 * (0.5 - env.eval_difficulty)).mean()
    assert env.evaluate() == pytest.approx(float(held_out))
    assert env.evaluate() == env.evaluate()  # exact, no rollout noise
    same_eval_set = make(seed=0, slope=2.0, initial_competence=0.5, num_prompts=77)
    assert same_eval_set.evaluate() == env.evaluate()  # the held-out set does not depend on the pool size


def test_cluster_means_are_spread_and_difficulty_follows_them():
    env = make(seed=0, num_prompts=20000, num_clusters=4, difficulty_mean=1.0, cluster_spread=3.0,
               difficulty_std=0.5)
    assert torch.allclose(env.cluster_means, torch.tensor([-0.5, 0.5, 1.5, 2.5]))
    for c in range(4):
        d = env.difficulty[env.clusters == c]
        assert abs(float(d.mean()) - float(env.cluster_means[c])) < 0.05
        assert abs(float(d.std()) - 0.5) < 0.05


def test_informative_groups_raise_competence_all_zero_and_all_one_do_not():
    env = make(seed=0, transfer=0.0)
    before = env.competence.clone()
    ids = ids_in_cluster(env, 2, 6)
    diag = env.train_on(groups(env, ids, [0, 8, 0, 8, 0, 8]))
    assert torch.equal(env.competence, before) and diag["signal"] == 0.0

    p_before = env.true_success(ids)
    env.train_on(groups(env, ids, [4, 2, 6, 1, 7, 3]))
    gained = env.competence - before
    assert gained[2] > 0
    assert torch.all(gained[torch.arange(8) != 2] == 0)  # no transfer: other clusters stay
    assert torch.all(env.true_success(ids) > p_before)


def test_update_is_the_documented_formula_with_transfer_and_dilution():
    lr, tau, clusters = 0.3, 0.5, 8
    env = make(seed=0, learning_rate=lr, transfer=tau)
    a = ids_in_cluster(env, 1, 1)
    zero = ids_in_cluster(env, 5, 3)
    # one informative group (s=4 of 8 -> signal 0.5) diluted by three all-0 groups: n = 4
    env.train_on(groups(env, torch.cat([a, zero]), [4, 0, 0, 0]))
    g = torch.zeros(clusters)
    g[1] = 0.5 / 4
    expected = lr * (g + tau * g.mean())
    assert torch.allclose(env.competence, expected)


def test_failed_groups_are_ignored():
    env = make(seed=0)
    ids = ids_in_cluster(env, 0, 2)
    env.train_on(groups(env, ids, [4, 4], failed=torch.tensor([True, True])))
    assert torch.all(env.competence == 0)


def test_forgetting_decays_untrained_clusters_toward_initial_competence():
    env = make(seed=0, transfer=0.0, forgetting=0.2, initial_competence=-1.0)
    first = ids_in_cluster(env, 0, 8)
    other = ids_in_cluster(env, 3, 8)
    for _ in range(5):
        env.train_on(groups(env, first, [4] * 8))
    learned = float(env.competence[0])
    assert learned > -1.0
    assert torch.allclose(env.competence[1:], torch.full((7,), -1.0))
    env.train_on(groups(env, other, [4] * 8))
    assert float(env.competence[0]) == pytest.approx(-1.0 + 0.8 * (learned + 1.0))
    env.train_on(groups(env, other, [8] * 8))  # an all-solved batch gives cluster 3 no signal either
    assert float(env.competence[0]) == pytest.approx(-1.0 + 0.64 * (learned + 1.0))
    trained_once = float(env.competence[3])
    env.train_on(groups(env, first, [0] * 8))
    assert float(env.competence[3]) == pytest.approx(-1.0 + 0.8 * (trained_once + 1.0))


def test_sudden_jump_happens_once_at_jump_step():
    env = make(seed=0, jump_step=3, jump_size=1.5)
    ids = torch.arange(4)
    acc = [env.evaluate()]
    for _ in range(5):
        env.train_on(groups(env, ids, [0, 0, 0, 0]))  # no signal: only the jump moves competence
        acc.append(env.evaluate())
    assert acc[0] == acc[1] == acc[2]
    assert acc[3] > acc[2] + 0.05
    assert acc[3] == acc[4] == acc[5]
    assert torch.allclose(env.competence, torch.full((8,), 1.5))


def test_features_carry_difficulty_and_cluster():
    env = make(seed=0, num_prompts=5000)
    x = env.pool.features
    assert x.dtype == torch.float32 and x.shape == (5000, 16)
    assert torch.equal(env.pool.clusters, env.clusters)
    design = torch.cat([x, torch.ones(5000, 1)], 1).double()
    coef = torch.linalg.lstsq(design, env.difficulty.double().unsqueeze(1)).solution
    residual = env.difficulty.double() - (design @ coef).squeeze(1)
    r2 = 1 - residual.var() / env.difficulty.double().var()
    assert r2 > 0.5
    centroids = torch.stack([x[env.clusters == c].mean(0) for c in range(8)])
    nearest = torch.cdist(x, centroids).argmin(1)
    assert (nearest == env.clusters).float().mean() > 0.5  # chance is 1/8
    noisy = make(seed=0, num_prompts=5000, feature_noise=5.0).pool.features
    assert not torch.equal(noisy, x)


def test_defaults_start_low_and_informative_selection_learns_faster():
    k, batch = 8, 64
    uniform, greedy = make(seed=0), make(seed=0)
    start = uniform.evaluate()
    assert 0.15 < start < 0.35
    p = uniform.true_success(torch.arange(2000))
    assert float((p ** k + (1 - p) ** k).mean()) > 0.3  # many all-0 / all-1 groups
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        cand = torch.randperm(2000, generator=g)[:8 * batch]
        uniform.train_on(uniform.rollout(cand[:batch], k))
        q = greedy.true_success(cand)
        greedy.train_on(greedy.rollout(cand[(1 - q ** k - (1 - q) ** k).topk(batch).indices], k))
    assert uniform.evaluate() > start + 0.1
    assert greedy.evaluate() > uniform.evaluate() + 0.1


def test_bad_input_is_rejected_and_changes_nothing():
    env = make(seed=0, num_prompts=50)
    state = env.generator.get_state()
    with pytest.raises(IndexError, match="unknown prompt id 50"):
        env.rollout(torch.tensor([0, 50]), 8)
    with pytest.raises(IndexError, match="unknown prompt id -1"):
        env.true_success(torch.tensor([-1]))
    with pytest.raises(TypeError, match="integers"):
        env.rollout(torch.tensor([0.0, 1.0]), 8)
    with pytest.raises(ValueError, match="k"):
        env.rollout(torch.tensor([0]), 0)
    with pytest.raises(ValueError, match="empty"):
        env.rollout(torch.tensor([], dtype=torch.long), 8)
    assert torch.equal(env.generator.get_state(), state)
    with pytest.raises(ValueError, match="successes"):
        env.train_on(groups(env, [0, 1], [3, 9]))
    with pytest.raises(ValueError, match="NaN"):
        env.train_on(groups(env, [0, 1], [3, float("nan")]))
    with pytest.raises(ValueError, match="trials"):
        env.train_on(Outcomes(torch.tensor([0]), torch.tensor([0.0]), torch.tensor([0.0])))
    assert torch.all(env.competence == 0) and env.updates == 0


def test_empty_batch_still_counts_as_an_update():
    env = make(seed=0, forgetting=0.5, initial_competence=0.0, jump_step=1, jump_size=1.0)
    env.train_on(groups(env, torch.tensor([], dtype=torch.long), []))
    assert env.updates == 1 and torch.allclose(env.competence, torch.ones(8))


def test_a_million_prompt_pool_constructs_and_rolls_out():
    env = make(seed=0, num_prompts=1_000_000)
    assert env.pool.size == 1_000_000
    assert env.pool.features.shape == (1_000_000, 16)
    out = env.rollout(torch.randint(0, 1_000_000, (4096,)), 8)
    assert out.successes.shape == (4096,)
    assert bool(((out.successes >= 0) & (out.successes <= 8)).all())
