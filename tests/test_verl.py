"""The verl adapter driven through verl 0.9.1's real task runner and `RayPPOTrainer.fit()`.

Only the GPU parts are faked: the rollout manager (a seeded Bernoulli reward per prompt, with
random response lengths so verl's batch balancing reorders rows), the weight-sync checkpoint
manager, the actor worker group (checkpoint save/load), `_compute_old_log_prob` and the actor's
update. Everything else (config composition, dataset, dataloader, sampler, reward extraction,
advantages, checkpoint files, resume) is verl's own. Runs in `.venv-verl` (`make test-verl`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("verl", reason="verl 0.9.1 is not installed in this environment; `make test-verl` builds "
                                   ".venv-verl and runs these tests there")

from verl import DataProto  # noqa: E402
from verl.trainer.ppo.ray_trainer import RayPPOTrainer  # noqa: E402

from mpts.integrations import verl as adapter  # noqa: E402
from mpts.integrations.verl_selection import VerlSelectionError  # noqa: E402
from mpts.models.base import PromptPool  # noqa: E402
from mpts.models.registry import get_predictor_class  # noqa: E402
from mpts.training.acquisition import get_acquisition_class  # noqa: E402
from mpts.training.replay import replay, validate_trace  # noqa: E402
from mpts.training.run_dir import METRICS_REQUIRED, TRACE_SCHEMA  # noqa: E402
from mpts.training.selector import Selector  # noqa: E402

NUM_PROMPTS, BATCH, K, RATIO = 48, 4, 4, 3
LABELS = [1000 + 3 * i for i in range(NUM_PROMPTS)]


def true_p(labels: np.ndarray) -> np.ndarray:
    return ((labels * 7) % 11) / 10.0  # 0.0 .. 1.0: some prompts never, some always solved


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A local Qwen2 config and char tokenizer (nothing downloaded; no weights: workers are fake)."""
    from transformers import Qwen2Config

    from mpts.training.environments.lm.tiny_lm import build_char_tokenizer

    folder = tmp_path_factory.mktemp("model")
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(folder)
    Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=1, num_key_value_heads=1, architectures=["Qwen2ForCausalLM"]).save_pretrained(folder)
    return folder


def write_data(folder: Path, extra_infos: list) -> tuple[Path, Path]:
    rows = [{"data_source": "toy", "prompt": [{"role": "user", "content": f"question {i}"}],
             "reward_model": {"style": "rule", "ground_truth": "1"}, "extra_info": info}
            for i, info in enumerate(extra_infos)]
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(folder / "train.parquet")
    pd.DataFrame(rows[:4]).to_parquet(folder / "val.parquet")
    return folder / "train.parquet", folder / "val.parquet"


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> tuple[Path, Path]:
    return write_data(tmp_path_factory.mktemp("data"), [{"index": label} for label in LABELS])


def verl_args(tmp: Path, model_dir: Path, data_files) -> list[str]:
    """A small CPU-sized verl setup (the fakes ignore the model; verl's config checks do not)."""
    train, val = data_files
    return [
        f"data.train_files={train}", f"data.val_files={val}", f"data.train_batch_size={BATCH}",
        "data.filter_overlong_prompts=False", "data.max_prompt_length=64", f"actor_rollout_ref.model.path={model_dir}",
        f"actor_rollout_ref.rollout.n={K}", "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2", "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
        "algorithm.adv_estimator=grpo", "trainer.val_before_train=False", "trainer.test_freq=-1",
        "trainer.logger=[console]", "trainer.n_gpus_per_node=1", "trainer.nnodes=1", "trainer.device=cpu",
        f"trainer.default_local_dir={tmp / 'ckpt'}", "trainer.total_training_steps=5", "trainer.save_freq=-1"]


def compose(tmp: Path, model_dir: Path, data_files, *extra: str):
    return adapter.compose_config([*verl_args(tmp, model_dir, data_files), f"mpts.candidate_ratio={RATIO}",
                                   "mpts.seed=3", "mpts.predictor.name=beta", "mpts.acquisition.name=thompson_target",
                                   *extra])


class FakeVerl:
    """Stands in for verl's GPU workers; records what was generated and what it scored."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.generated: list[list[int]] = []  # prompt labels per step, one per rollout
        self.rewards: list[np.ndarray] = []
        self.actor_updates = 0

    def install(self, trainer: RayPPOTrainer) -> None:
        fake = self

        class Rollout:
            def generate_sequences(self, batch: DataProto) -> DataProto:
                return fake.generate(batch)

        class WeightSync:
            def update_weights(self, step):
                pass

            def sleep_replicas(self):
                pass

        class ActorGroup:
            _dispatch_info = {"actor": [0, 1]}  # two data-parallel ranks: balance_batch reorders rows

            def save_checkpoint(self, local_path, *args, **kwargs):
                Path(local_path).mkdir(parents=True, exist_ok=True)

            def load_checkpoint(self, local_path, **kwargs):
                pass

        trainer.async_rollout_manager, trainer.checkpoint_manager = Rollout(), WeightSync()
        trainer.actor_rollout_wg = ActorGroup()

    def generate(self, batch: DataProto) -> DataProto:
        labels = np.array([info["index"] for info in batch.non_tensor_batch["extra_info"]])
        n, prompt_len, response_len = len(labels), 6, 5
        rewards = (self.rng.random(n) < true_p(labels)).astype(np.float32)
        self.generated.append(labels.tolist())
        self.rewards.append(rewards)
        lengths = torch.from_numpy(self.rng.integers(1, response_len + 1, n))
        response_mask = (torch.arange(response_len)[None, :] < lengths[:, None]).long()
        scores = torch.zeros(n, response_len)
        scores[torch.arange(n), lengths - 1] = torch.from_numpy(rewards)
        ids = torch.ones(n, prompt_len + response_len, dtype=torch.long)
        attention = torch.cat([torch.ones(n, prompt_len, dtype=torch.long), response_mask], 1)
        return DataProto.from_dict(
            tensors={"prompts": ids[:, :prompt_len], "responses": ids[:, prompt_len:], "input_ids": ids,
                     "attention_mask": attention, "position_ids": torch.arange(prompt_len + response_len).expand(n, -1),
                     "response_mask": response_mask, "rm_scores": scores},
            non_tensors={"acc": rewards.astype(np.float64), "multi_modal_inputs": np.array([{}] * n, dtype=object)},
            meta_info={"timing": {}, "reward_extra_keys": ["acc"]})


@pytest.fixture
def fake_verl(monkeypatch) -> FakeVerl:
    fake = FakeVerl()

    def old_log_prob(self, batch):
        shape = batch.batch["responses"].shape
        return DataProto.from_dict(tensors={"old_log_probs": torch.zeros(shape), "entropys": torch.zeros(shape)}), 0.0

    def update_actor(self, batch):
        fake.actor_updates += 1
        return DataProto(meta_info={"metrics": {}})

    monkeypatch.setattr(RayPPOTrainer, "init_workers", lambda self: fake.install(self))
    monkeypatch.setattr(RayPPOTrainer, "_compute_old_log_prob", old_log_prob)
    monkeypatch.setattr(RayPPOTrainer, "_update_actor", update_actor)
    return fake


def run_verl(config) -> None:
    """verl's legacy task runner body with mpts's sampler and trainer, in this process."""
    adapter._SelectingTaskRunnerBody().run(config)


def direct_selector() -> Selector:
    """The same predictor, rule and seed as the adapter's, to be fed the same outcomes by hand."""
    predictor = get_predictor_class("beta")
    rule = get_acquisition_class("thompson_target")
    return Selector(predictor(PromptPool(size=NUM_PROMPTS), predictor.Options(), seed=3), rule(rule.Options()),
                    k=K, seed=3, ids=np.array(LABELS))


def grouped(labels: list[int], rewards: np.ndarray, order) -> tuple[torch.Tensor, torch.Tensor]:
    frame = pd.DataFrame({"label": labels, "win": rewards >= 1.0}).groupby("label")["win"].agg(["sum", "count"])
    frame = frame.loc[list(order)]
    return torch.tensor(frame["sum"].to_numpy(), dtype=torch.float32), torch.tensor(frame["count"].to_numpy(), dtype=torch.float32)


def test_fit_generates_exactly_the_selected_prompts_and_observes_their_outcomes(tmp_path, model_dir, data_files, fake_verl):
    config = compose(tmp_path, model_dir, data_files)
    run_verl(config)
    run_dir = tmp_path / "ckpt" / "mpts"
    trace = pd.read_parquet(run_dir / "trace.parquet")
    assert sorted(trace["step"].unique()) == [0, 1, 2, 3, 4] and fake_verl.actor_updates == 5  # verl's step - 1

    direct = direct_selector()
    for step, (generated, rewards) in enumerate(zip(fake_verl.generated, fake_verl.rewards)):
        rows = trace[trace["step"] == step]
        # what verl generated for is exactly what mpts selected, k rollouts each
        assert sorted(set(generated)) == sorted(rows["prompt_id"]) and len(generated) == BATCH * K
        # and what a selector fed the same outcomes by hand selects, predicts and records
        selection = direct.select(direct.sample_candidates(BATCH * RATIO, step), BATCH, step)
        assert rows["prompt_id"].tolist() == selection.ids.tolist()
        successes, trials = grouped(generated, rewards, selection.ids)
        assert rows["successes"].tolist() == successes.long().tolist() and set(rows["trials"]) == {K}
        columns = direct.prediction_columns(selection.posterior, successes, trials, step)
        for name, values in columns.items():
            np.testing.assert_allclose(rows[name].to_numpy(), values, rtol=1e-6, err_msg=name)
        direct.observe(selection.ids, successes, trials, step)

    final = torch.load(run_dir / "checkpoints" / "predictor_final.pt", weights_only=True)
    expected = direct.predictor.state_dict()
    torch.testing.assert_close(final.pop("state"), expected.pop("state"), rtol=0, atol=0)
    assert final == expected
    assert (trace["selected_by"] == "thompson_target").all() and trace["kept"].all() and not trace["failed"].any()


def test_the_predictor_sees_the_prompt_texts_in_dataset_order(tmp_path, model_dir, data_files):
    from verl.trainer.ppo.utils import create_rl_dataset

    config = compose(tmp_path, model_dir, data_files)
    dataset = create_rl_dataset(config.data.train_files, config.data, tokenizer=None, processor=None)
    pool = adapter.build_sampler(config, dataset).selection.selector.predictor.pool
    assert pool.texts == tuple(f"question {i}" for i in range(NUM_PROMPTS)) and pool.has_features


def test_run_folder_holds_the_mpts_schema_and_replays(tmp_path, model_dir, data_files, fake_verl):
    run_verl(compose(tmp_path, model_dir, data_files, "trainer.total_training_steps=3"))
    run_dir = tmp_path / "ckpt" / "mpts"
    trace = pd.read_parquet(run_dir / "trace.parquet")
    assert list(trace.columns) == TRACE_SCHEMA.names
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    assert set(METRICS_REQUIRED) <= set(metrics.columns)
    assert metrics["cumulative_rollouts"].tolist() == [BATCH * K, 2 * BATCH * K, 3 * BATCH * K]
    assert (metrics["train_seconds"] >= 0).all() and metrics["wall_seconds"].is_monotonic_increasing
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["total_rollouts"] == 3 * BATCH * K and summary["rows"] == 3 * BATCH
    scores, scored = replay(validate_trace(trace), "beta", num_prompts=max(LABELS) + 1)
    assert scores["steps"] == 3 and len(scored) == 3 * BATCH


def test_selector_state_is_saved_with_verl_checkpoints_and_resumed(tmp_path, model_dir, data_files, fake_verl):
    straight = tmp_path / "straight"
    run_verl(compose(straight, model_dir, data_files, "trainer.total_training_steps=4"))
    reference = pd.read_parquet(straight / "ckpt" / "mpts" / "trace.parquet")

    resumed = tmp_path / "resumed"
    fake_verl.rng = np.random.default_rng(0)
    run_verl(compose(resumed, model_dir, data_files, "trainer.total_training_steps=2", "trainer.save_freq=2"))
    assert (resumed / "ckpt" / "global_step_2" / adapter.SELECTOR_FILE).is_file()
    run_verl(compose(resumed, model_dir, data_files, "trainer.total_training_steps=4", "trainer.save_freq=2",
                     "trainer.resume_mode=auto"))
    trace = pd.read_parquet(resumed / "ckpt" / "mpts" / "trace.parquet")
    # the rewards continue the same random stream, so the resumed run is the straight run
    pd.testing.assert_frame_equal(trace, reference)


def test_a_resume_without_selector_state_or_over_an_existing_run_is_refused(tmp_path, model_dir, data_files,
                                                                            fake_verl):
    run_verl(compose(tmp_path, model_dir, data_files, "trainer.total_training_steps=2", "trainer.save_freq=2"))
    trace = (tmp_path / "ckpt" / "mpts" / "trace.parquet").read_bytes()
    with pytest.raises(VerlSelectionError, match="already holds a run \\(or other files\\); continue that run with trainer.resume_mode=auto"):
        run_verl(compose(tmp_path, model_dir, data_files, "trainer.resume_mode=disable"))
    (tmp_path / "ckpt" / "global_step_2" / adapter.SELECTOR_FILE).unlink()
    with pytest.raises(VerlSelectionError, match="has no mpts_selector.pt"):
        run_verl(compose(tmp_path, model_dir, data_files, "trainer.total_training_steps=4", "trainer.resume_mode=auto"))
    assert (tmp_path / "ckpt" / "mpts" / "trace.parquet").read_bytes() == trace  # the user's run untouched
    assert len(fake_verl.generated) == 2


@pytest.mark.parametrize("override, message", [
    ("data.dataloader_num_workers=2", "dataloader_num_workers must be 0"),
    ("trainer.use_v1=True", "trainer.use_v1 must be False"),
    ("trainer.critic_warmup=2", "critic_warmup > 0 without a critic"),
    ("mpts.predictor.decai=0.5", "predictor: decai: unknown key"),
    ("mpts.acquisition.name=dynamic_sampling", "rolls out every candidate"),
    ("mpts.candidate_ratio=20", "exceeds the 48 training prompts"),
])
def test_bad_setups_are_refused_before_training(tmp_path, model_dir, data_files, fake_verl, override, message):
    with pytest.raises(VerlSelectionError, match=message):
        run_verl(compose(tmp_path, model_dir, data_files, override))
    assert fake_verl.generated == [] and not (tmp_path / "ckpt" / "mpts" / "trace.parquet").exists()


@pytest.mark.parametrize("infos, message", [
    ([{"split": "train"}] * NUM_PROMPTS, "missing or None at row 0"),
    ([{"index": 7}] * NUM_PROMPTS, "every row has extra_info\\['index'\\] == 7"),
    ([{"index": i} for i in range(NUM_PROMPTS - 1)] + [{"index": None}], "missing or None at row 47"),
    ([{"index": i % 40} for i in range(NUM_PROMPTS)], "appears more than once"),
])
def test_datasets_without_distinct_indices_are_refused(tmp_path, model_dir, infos, message, fake_verl):
    files = write_data(tmp_path / "data", infos)
    with pytest.raises(ValueError, match=message):
        run_verl(compose(tmp_path, model_dir, files))
    assert fake_verl.generated == []


def test_a_batch_with_foreign_prompts_is_refused_before_the_update(tmp_path, model_dir, data_files, fake_verl,
                                                                 monkeypatch):
    faked = RayPPOTrainer._compute_old_log_prob

    def relabel_at_step_2(self, batch):
        if self.global_steps == 2:  # one rollout claims a prompt mpts did not select
            chosen = {info["index"] for info in batch.non_tensor_batch["extra_info"]}
            batch.non_tensor_batch["extra_info"][0] = {"index": next(x for x in LABELS if x not in chosen)}
        return faked(self, batch)

    monkeypatch.setattr(RayPPOTrainer, "_compute_old_log_prob", relabel_at_step_2)
    with pytest.raises(VerlSelectionError, match="did not select for this step"):
        run_verl(compose(tmp_path, model_dir, data_files))
    assert fake_verl.actor_updates == 1  # step 2 never reached the policy update


def test_one_command_launch_composes_verls_config_and_runs_the_mpts_task_runner(tmp_path, model_dir, data_files,
                                                                                fake_verl, monkeypatch, capsys):
    launched = {}
    monkeypatch.setattr(adapter.main_ppo, "run_ppo",
                        lambda config, task_runner_class: launched.update(config=config, runner=task_runner_class))
    train, val = data_files
    adapter.main([f"data.train_files={train}", f"data.val_files={val}", f"actor_rollout_ref.model.path={model_dir}",
                  "mpts.predictor.name=hmm3", "mpts.acquisition.name=top_informative", "mpts.candidate_ratio=4"])
    config = launched["config"]
    assert launched["runner"] is adapter.SelectingTaskRunner
    assert config.trainer.use_v1 is False and config.data.dataloader_num_workers == 0
    assert (config.mpts.predictor, config.mpts.acquisition) == ({"name": "hmm3"}, {"name": "top_informative"})
    assert config.mpts.candidate_ratio == 4 and config.mpts.success_threshold == 1.0
    # every refusal: exit 2 and one line on stderr, as `mpts` (a bad verl override from Hydra included)
    for argv, message in ([[f"data.train_files={train}", "data.dataloader_num_workers=4"],
                           "data.dataloader_num_workers must be 0 (got 4)"],
                          [["mpts.predictor.decai=0.5"], "mpts.predictor: decai: unknown key (known: decay"],
                          [["mpts.candidate_ratio=0"], "mpts: candidate_ratio: Input should be greater than or equal to 1"],
                          [["data.no_such_key=3"], "no_such_key"]):
        with pytest.raises(SystemExit) as exited:
            adapter.main(argv)
        err = capsys.readouterr().err
        assert exited.value.code == 2 and message in err and err.startswith("error: ") and err.count("\n") == 1, err


def test_the_task_runner_runs_as_a_ray_actor(tmp_path, model_dir):
    """The remote runner starts in its own Ray process and refuses there, before any worker starts,
    a dataset whose prompts all carry the same index."""
    import ray

    files = write_data(tmp_path / "data", [{"index": 0}] * NUM_PROMPTS)
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # its own cluster, not a neighbour's
    try:
        with pytest.raises(Exception, match="every row has extra_info\\['index'\\] == 0"):
            adapter.main(verl_args(tmp_path, model_dir, files))
    finally:
        ray.shutdown()


@pytest.mark.parametrize("selection", ["mpts_beta.txt", "mpts_hmm3.txt"])
def test_the_example_launch_composes_with_verl_and_passes_the_adapters_checks(tmp_path, selection):
    """examples/verl/run.sh with `python` stubbed to print its arguments, fed to the real composition."""
    import os
    import subprocess

    stub = tmp_path / "bin" / "python"
    stub.parent.mkdir()
    stub.write_text('#!/bin/sh\nshift 2\nprintf "%s\\n" "$@"\n')
    stub.chmod(0o755)
    example = Path(__file__).parents[1] / "examples" / "verl"
    env = {**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}", "MODEL": "/models/qwen", "DATA": "/data/gsm8k"}
    printed = subprocess.run([str(example / "run.sh"), str(example / "overrides" / selection), "trainer.total_epochs=1"],
                             env=env, capture_output=True, text=True, check=True).stdout.splitlines()
    config = adapter.compose_config(printed)
    assert config.data.train_files == "/data/gsm8k/train.parquet" and config.actor_rollout_ref.model.path == "/models/qwen"
    assert config.trainer.total_epochs == 1 and config.actor_rollout_ref.rollout.name == "vllm"
    assert config.mpts.predictor.name == selection.removeprefix("mpts_").removesuffix(".txt")
