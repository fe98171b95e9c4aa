"""mpts prompt selection inside verl 0.9.1's `RayPPOTrainer` (the legacy trainer, `trainer.use_v1=False`).

Launch (one command; every verl Hydra override works, `mpts.*` are ours)::

    python -m mpts.integrations.verl data.train_files=... actor_rollout_ref.model.path=... \\
        mpts.predictor.name=beta mpts.acquisition.name=thompson_target mpts.candidate_ratio=8

Per training step::

    sampler: C = candidate_ratio x B candidate prompts -> selector.select -> B dataset rows
    verl:    generate k = rollout.n responses per row, reward, advantages
    trainer: _update_critic / _update_actor (the first one per step) -> group the batch's rollouts
             by extra_info["index"] -> successes (reward >= success_threshold), trials -> trace row
             (the prediction was made before the outcome) -> selector.observe

The sampler selects lazily, when the dataloader asks for a batch's first index, which with
`data.dataloader_num_workers=0` is after the previous step's outcomes were observed (with workers
the dataloader chooses several batches ahead, so selection would run blind). The v1 trainer builds
its own sampler and has no prompt hook, hence the legacy trainer.

The run is written as an mpts run folder (`mpts.out`, default `<trainer.default_local_dir>/mpts`) by
the loop's `RunRecorder`: parts with a manifest as the run goes, then trace.parquet, metrics.parquet
and summary.json, so `mpts report` and `mpts replay` read it as they read `mpts run`'s; its steps count from 0 (verl's global step minus one). The selector's
state is saved next to verl's checkpoint (`global_step_N/mpts_selector.pt`) and restored with it;
verl's validation metrics stay in verl's own logger (eval_accuracy is empty in the mpts metrics).
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
from torch.utils.data import Sampler

from mpts.integrations.verl_selection import (PromptSelection, SelectionConfig, VerlSelectionError, batch_labels,
                                              read_selection_config, read_selector_state, write_selector_state)
from mpts.training.config import ConfigError, apply_overrides

try:
    import ray
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf import DictConfig, OmegaConf, open_dict
    from verl.trainer import main_ppo, main_ppo_v0
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer
    from verl.trainer.ppo.utils import need_critic
except ImportError as error:  # pragma: no cover - exercised where verl is absent
    raise ImportError(f"mpts.integrations.verl needs verl 0.9.1 ({error}); install mpts into verl's environment "
                      "with `pip install 'mpts[verl]'` (see examples/verl/README.md)") from None

SELECTOR_FILE = "mpts_selector.pt"
MPTS_PREFIX = "mpts."


def check_verl_config(config: DictConfig) -> None:
    """Refuse verl settings under which selection would run blind or never observe."""
    if config.trainer.get("use_v1", False):
        raise VerlSelectionError("trainer.use_v1 must be False: verl's v1 trainer builds its own sampler and has no "
                                 "prompt hook; mpts selects through the legacy RayPPOTrainer")
    workers = config.data.get("dataloader_num_workers", 8)
    if workers != 0:
        raise VerlSelectionError(f"data.dataloader_num_workers must be 0 (got {workers}): with worker processes the "
                                 "dataloader chooses batches ahead, before the previous steps' outcomes are known, "
                                 "so the predictor would select blind")
    if config.trainer.get("critic_warmup", 0) > 0 and not need_critic(config):
        raise VerlSelectionError("trainer.critic_warmup > 0 without a critic skips every update during warm-up, so "
                                 "mpts would never see those steps' outcomes; set trainer.critic_warmup=0")


def dataset_labels(dataset) -> np.ndarray:
    """Each training row's `extra_info["index"]`: the prompt ids the predictor is keyed by."""
    frame = getattr(dataset, "dataframe", None)
    if frame is None or "extra_info" not in frame.column_names:
        raise VerlSelectionError("the training data has no extra_info column: mpts keys prompts by "
                                 "extra_info['index'] (verl turns a missing one into 0 for every prompt)")
    return batch_labels(frame["extra_info"], "training data")


def dataset_texts(dataset) -> list[str]:
    """Each training row's prompt as text (a chat prompt's message contents, one per line)."""
    frame = dataset.dataframe
    key = getattr(dataset, "prompt_key", "prompt")
    if key not in frame.column_names:
        raise VerlSelectionError(f"the training data has no {key!r} column (data.prompt_key)")
    return [prompt if isinstance(prompt, str) else "\n".join(str(m.get("content", "")) for m in prompt)
            for prompt in frame[key]]


class SelectingSampler(Sampler):
    """Yields the rows `PromptSelection` chooses, one batch at a time, when the dataloader asks.

    Stateful (torchdata's protocol), so a resumed dataloader continues its epoch without
    fast-forwarding through (and so selecting for) the batches already trained on.
    """

    def __init__(self, selection: PromptSelection, num_batches: int):
        self.selection, self.num_batches = selection, int(num_batches)
        self.yielded_batches = 0
        self._resume_at = 0

    def __len__(self) -> int:
        return self.num_batches * self.selection.batch_size

    def __iter__(self) -> Iterator[int]:
        self.yielded_batches, self._resume_at = self._resume_at, 0
        while self.yielded_batches < self.num_batches:
            rows = self.selection.choose()
            self.yielded_batches += 1
            yield from rows

    def state_dict(self) -> dict[str, int]:
        return {"yielded_batches": self.yielded_batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume_at = int(state["yielded_batches"])


def build_sampler(config: DictConfig, dataset) -> SelectingSampler:
    """The sampler (and the selection behind it) for a verl config and its training dataset."""
    check_verl_config(config)
    options = read_selection_config(OmegaConf.to_container(config.get("mpts") or {}, resolve=True))
    batch_size = config.data.get("gen_batch_size") or config.data.train_batch_size
    labels = dataset_labels(dataset)
    out = Path(options.out) if options.out else Path(config.trainer.default_local_dir) / "mpts"
    selection = PromptSelection(options, labels, batch_size, config.actor_rollout_ref.rollout.n, out,
                                texts=dataset_texts(dataset))
    return SelectingSampler(selection, len(labels) // batch_size)


class SelectingPPOTrainer(RayPPOTrainer):
    """`RayPPOTrainer` whose training prompts mpts chooses (`train_sampler` is a `SelectingSampler`)
    and whose scored batches mpts observes before the policy update."""

    def __init__(self, config, *args, train_sampler: SelectingSampler | None = None, **kwargs):
        check_verl_config(config)
        if not isinstance(train_sampler, SelectingSampler):
            raise VerlSelectionError("SelectingPPOTrainer needs train_sampler=build_sampler(config, dataset)")
        self.selection = train_sampler.selection
        self._observed_step = 0
        super().__init__(config, *args, train_sampler=train_sampler, **kwargs)

    # Outcomes: the batch reaches _update_critic (with a critic) and _update_actor (after any critic
    # warm-up) with rewards and advantages computed; the first of them each step observes it.
    def _observe_once(self, batch) -> None:
        if self._observed_step == self.global_steps:
            return
        reward = self.selection.options.reward
        if reward == "score":
            rewards = batch.batch["token_level_scores"].sum(-1).double().numpy()
        elif reward in batch.non_tensor_batch:
            rewards = batch.non_tensor_batch[reward]
        else:
            raise VerlSelectionError(f"mpts.reward={reward!r} is neither 'score' nor a reward extra of the batch "
                                     f"({', '.join(sorted(batch.non_tensor_batch))})")
        self.selection.observe(batch.non_tensor_batch.get("extra_info"), rewards, self.global_steps - 1)
        self._observed_step = self.global_steps

    def _update_critic(self, batch):
        self._observe_once(batch)
        with self._train_timer():
            return super()._update_critic(batch)

    def _update_actor(self, batch):
        self._observe_once(batch)
        with self._train_timer():
            return super()._update_actor(batch)

    @contextlib.contextmanager
    def _train_timer(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.selection.add_train_seconds(time.perf_counter() - start)

    # Checkpoints: the selector's state sits in verl's global_step_N folder and is restored with it.
    def _selector_file(self) -> Path:
        folder = Path(self.config.trainer.default_local_dir)
        if not folder.is_absolute():
            folder = Path.cwd() / folder
        return folder / f"global_step_{self.global_steps}" / SELECTOR_FILE

    def _save_checkpoint(self):
        super()._save_checkpoint()
        state = self.selection.checkpoint(self.total_training_steps)
        write_selector_state(state, self._selector_file())

    def _load_checkpoint(self):
        result = super()._load_checkpoint()
        if self.global_steps == 0:
            self.selection.start(self.total_training_steps)
            return result
        path = self._selector_file()
        if not path.is_file():
            raise VerlSelectionError(f"verl resumes from {path.parent}, which has no {SELECTOR_FILE}: that "
                                     "checkpoint was not written with mpts selection")
        state = read_selector_state(path)
        self.selection.resume(state, self.global_steps)
        self._observed_step = self.global_steps
        return result

    def fit(self):
        super().fit()
        if self.selection.steps_done > 0:
            self.selection.finish(self.total_training_steps)


class _SelectingTaskRunnerBody(main_ppo_v0.TaskRunner.__ray_metadata__.modified_class):
    """verl's own legacy TaskRunner.run (workers, datasets, tokenizer, reward set-up) with its
    sampler and trainer swapped for mpts's, inside the runner's own Ray process."""

    def run(self, config):
        def sampler(data_config, dataset):
            return build_sampler(config, dataset)

        replaced = {"create_rl_sampler": sampler, "RayPPOTrainer": SelectingPPOTrainer}
        original = {name: getattr(main_ppo_v0, name) for name in replaced}
        try:
            for name, value in replaced.items():
                setattr(main_ppo_v0, name, value)
            return super().run(config)
        finally:
            for name, value in original.items():
                setattr(main_ppo_v0, name, value)


SelectingTaskRunner = ray.remote(_SelectingTaskRunnerBody)


def compose_config(argv: list[str], config_name: str = "ppo_trainer") -> DictConfig:
    """verl's Hydra config with the user's overrides; `mpts.*` overrides form the `mpts` section.

    Defaults that selection needs (`trainer.use_v1=False`, `data.dataloader_num_workers=0`) apply
    unless the user sets them (then `check_verl_config` refuses a wrong value with the reason).
    """
    mpts_args = [arg[len(MPTS_PREFIX):] for arg in argv if arg.startswith(MPTS_PREFIX)]
    verl_args = [arg for arg in argv if not arg.startswith(MPTS_PREFIX)]
    given = {arg.split("=", 1)[0].lstrip("+~") for arg in verl_args}
    defaults = [f"{key}={value}" for key, value in
                (("trainer.use_v1", "False"), ("data.dataloader_num_workers", "0")) if key not in given]
    try:
        section = apply_overrides(SelectionConfig().model_dump(mode="json"), mpts_args)
    except ConfigError as error:
        raise VerlSelectionError(f"mpts: {error}") from None
    read_selection_config(section)  # refuse a bad mpts section before verl starts anything
    with initialize_config_module("verl.trainer.config", version_base=None):
        config = compose(config_name, overrides=defaults + verl_args)
    with open_dict(config):
        config.mpts = section
    check_verl_config(config)
    return config


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    config_name = "ppo_trainer"
    if argv and argv[0].startswith("--config-name"):  # verl's other configs, e.g. ppo_megatron_trainer
        flag = argv.pop(0)
        config_name = flag.split("=", 1)[1] if "=" in flag else argv.pop(0)
    try:
        config = compose_config(argv, config_name)
    except (VerlSelectionError, HydraException) as error:  # the user's overrides: one line, exit 2 like `mpts`
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        sys.exit(2)
    main_ppo.auto_set_device(config)
    main_ppo.run_ppo(config, task_runner_class=SelectingTaskRunner)


if __name__ == "__main__":
    main()
