"""GRPO: advantages, the clipped loss, and what one update does to a tiny policy."""

import pytest
import torch

from mpts.training.environments.lm.grpo import (GRPOConfig, GRPOTrainer, Sequences, collate, completion_logprobs,
                                group_advantages, policy_loss)
from mpts.training.environments.lm.tiny_lm import TinyModelOptions, build_char_tokenizer, build_tiny_model

TINY = TinyModelOptions(hidden_size=64, num_layers=1, num_heads=1, num_kv_heads=1, intermediate_size=128)


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def make_model(tokenizer, seed=0):
    return build_tiny_model(tokenizer, TINY, seed).eval()


def encode(tokenizer, text, eos=False):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id] if eos else ids


def test_group_advantages_normalise_within_each_group():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    adv = group_advantages(rewards)
    assert torch.allclose(adv[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-5)
    assert torch.equal(adv[1], torch.zeros(4))  # all equal: exactly zero
    assert adv[2, 3] > 0 > adv[2, 0]
    assert torch.allclose(adv.sum(dim=1), torch.zeros(3), atol=1e-5)
    assert torch.equal(group_advantages(torch.full((1, 3), 0.3)), torch.zeros(1, 3))
    centred = group_advantages(rewards, scale_by_std=False)
    assert torch.allclose(centred[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    with pytest.raises(ValueError, match="groups, k"):
        group_advantages(torch.ones(4))


def test_completion_logprobs_match_a_plain_forward_and_ignore_padding(tokenizer):
    model = make_model(tokenizer)
    prompt, short_prompt = encode(tokenizer, "12+34="), encode(tokenizer, "5=")
    answer, other = encode(tokenizer, "46", eos=True), encode(tokenizer, "7777", eos=True)
    batched, mask = completion_logprobs(model, [prompt, short_prompt], [answer, other], tokenizer.pad_token_id)
    assert mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + answer])).logits[0]
    direct = logits.log_softmax(-1)[len(prompt) - 1:-1].gather(1, torch.tensor(answer)[:, None]).squeeze(1)
    assert torch.allclose(batched[0, :3], direct, atol=1e-5)
    alone, _ = completion_logprobs(model, [short_prompt], [other], tokenizer.pad_token_id)
    assert torch.allclose(batched[1], alone[0], atol=1e-5)


def test_collate_aligns_completions_on_one_column(tokenizer):
    ids, attention, positions, mask = collate([[7, 8, 9], [5]], [[1, 2], [3, 4, 6]], pad_id=0, device=torch.device("cpu"))
    assert ids.tolist() == [[7, 8, 9, 1, 2, 0], [0, 0, 5, 3, 4, 6]]
    assert attention.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert positions[1, 2:].tolist() == [0, 1, 2, 3]
    assert mask.tolist() == [[True, True, False], [True, True, True]]


def test_group_with_equal_rewards_contributes_exactly_zero_gradient(tokenizer):
    model = make_model(tokenizer)
    prompt = encode(tokenizer, "3+4=")
    completions = [encode(tokenizer, t, eos=True) for t in ("7", "8", "12", "7")]
    advantages = group_advantages(torch.ones(1, 4))[0]  # every completion rewarded
    logp, mask = completion_logprobs(model, [prompt] * 4, completions, tokenizer.pad_token_id)
    loss, _ = policy_loss(logp, logp.detach(), advantages, mask, 0.2, 0.28)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads)


def test_equal_reward_group_only_dilutes_the_token_mean(tokenizer):
    """Adding an all-equal group changes the update only through the token-mean denominator."""
    prompt_a, prompt_b = encode(tokenizer, "3+4="), encode(tokenizer, "9-2=")
    informative = Sequences([prompt_a] * 2, [encode(tokenizer, "7", eos=True), encode(tokenizer, "8", eos=True)],
                            group_advantages(torch.tensor([[1.0, 0.0]]))[0])
    flat = Sequences([prompt_b] * 2, [encode(tokenizer, "7", eos=True), encode(tokenizer, "77", eos=True)],
                     group_advantages(torch.tensor([[0.0, 0.0]]))[0])
    both = Sequences(informative.prompt_ids + flat.prompt_ids, informative.completion_ids + flat.completion_ids,
                     torch.cat([informative.advantages, flat.advantages]))
    config = GRPOConfig(lr=0.0, max_grad_norm=1e9)  # lr 0: the gradient stays, the weights do not move

    def gradient(batch):
        model = make_model(tokenizer)
        GRPOTrainer(model, config, tokenizer.pad_token_id).step(batch)
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    ratio = both.num_tokens() / informative.num_tokens()
    assert torch.allclose(gradient(both) * ratio, gradient(informative), atol=1e-6)


def test_one_step_moves_probability_toward_the_rewarded_completion(tokenizer):
    model = make_model(tokenizer)
    prompt = encode(tokenizer, "3+4=")
    good, bad = encode(tokenizer, "7", eos=True), encode(tokenizer, "9", eos=True)
    batch = Sequences([prompt] * 4, [good, bad, bad, bad], group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))[0])

    def sequence_logprob(completion):
        with torch.no_grad():
            logp, _ = completion_logprobs(model, [prompt], [completion], tokenizer.pad_token_id)
        return float(logp.sum())

    before_good, before_bad = sequence_logprob(good), sequence_logprob(bad)
    stats = GRPOTrainer(model, GRPOConfig(lr=1e-2), tokenizer.pad_token_id).step(batch)
    assert sequence_logprob(good) > before_good + 0.1
    assert sequence_logprob(bad) < before_bad
    assert stats["grad_norm"] > 0 and stats["tokens"] == 8


def test_clip_bounds_the_ratio_on_later_minibatches_and_kl_pulls_back(tokenizer):
    model = make_model(tokenizer)
    prompt = encode(tokenizer, "3+4=")
    good, bad = encode(tokenizer, "7", eos=True), encode(tokenizer, "9", eos=True)
    batch = Sequences([prompt] * 8, [good, bad] * 4, group_advantages(torch.tensor([[1.0, 0.0] * 4]))[0])
    stats = GRPOTrainer(model, GRPOConfig(lr=5e-2, updates_per_batch=4, micro_batch_size=1, kl_coef=0.1),
                        tokenizer.pad_token_id).step(batch)
    assert stats["clip_fraction"] > 0  # the policy moved past 1 +- clip within the batch
    assert stats["kl"] > 1e-6  # measured against the frozen reference after the policy moved

    def drift(kl_coef):
        """How far the log-probabilities of the batch's completions moved from the initial policy."""
        moved = make_model(tokenizer)
        GRPOTrainer(moved, GRPOConfig(lr=1e-2, updates_per_batch=4, micro_batch_size=1, kl_coef=kl_coef),
                    tokenizer.pad_token_id).step(batch)
        with torch.no_grad():
            after, mask = completion_logprobs(moved, [prompt] * 2, [good, bad], tokenizer.pad_token_id)
            before, _ = completion_logprobs(make_model(tokenizer), [prompt] * 2, [good, bad], tokenizer.pad_token_id)
        return float(((after - before).abs() * mask).sum())

    free, held = drift(0.0), drift(5.0)
    assert 0 < held < 0.8 * free  # the KL term pulls the update back toward the reference


def test_learning_rate_warms_up_linearly(tokenizer):
    trainer = GRPOTrainer(make_model(tokenizer), GRPOConfig(lr=1e-3, warmup_updates=4), tokenizer.pad_token_id)
    prompt = encode(tokenizer, "3+4=")
    batch = Sequences([prompt] * 2, [encode(tokenizer, "7", eos=True), encode(tokenizer, "9", eos=True)],
                      torch.tensor([1.0, -1.0]))
    rates = []
    for _ in range(5):
        rates.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.step(batch)
    assert rates == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    resumed = GRPOTrainer(make_model(tokenizer), GRPOConfig(lr=1e-3, warmup_updates=4), tokenizer.pad_token_id)
    resumed.load_state_dict(trainer.state_dict())
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_policy_loss_clip_is_asymmetric():
    logp = torch.log(torch.tensor([[1.5, 0.5]]))
    old = torch.zeros(1, 2)
    mask = torch.ones(1, 2, dtype=torch.bool)
    up, _ = policy_loss(logp[:, :1], old[:, :1], torch.tensor([1.0]), mask[:, :1], clip_low=0.2, clip_high=0.28)
    down, _ = policy_loss(logp[:, 1:], old[:, 1:], torch.tensor([-1.0]), mask[:, 1:], clip_low=0.2, clip_high=0.28)
    assert float(up) == pytest.approx(-1.28)  # ratio 1.5 clipped at 1 + clip_high
    assert float(down) == pytest.approx(0.8)  # ratio 0.5 clipped at 1 - clip_low


def test_sequences_reject_mismatched_lengths():
    with pytest.raises(ValueError, match="disagree"):
        Sequences([[1]], [[2], [3]], torch.zeros(1))
    with pytest.raises(ValueError, match="empty"):
        GRPOTrainer(torch.nn.Linear(1, 1), GRPOConfig(), 0).step(Sequences([], [], torch.zeros(0)))
