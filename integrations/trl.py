"""TRL adapter: any mpts predictor and acquisition rule choose the prompts of TRL's GRPOTrainer::

    trainer = SelectiveGRPOTrainer(model=..., reward_funcs=[...], args=GRPOConfig(...),
                                   train_dataset=dataset, processing_class=tokenizer,
                                   selection={"predictor": "beta", "rule": "thompson_target"})
    trainer.train()          # the run lands in <output_dir>/mpts: `mpts report` / `mpts replay` read it

Each generation step (once per `steps_per_generation x num_iterations` optimisation steps) the
trainer draws C = candidate_ratio x B candidate prompts from the dataset, asks the `Selector` for
B of them, generates `num_generations` completions for each, scores them with the user's reward
functions, turns each prompt's rewards into (successes, trials) and lets the predictor observe
them. Selection happens in `_generate_and_score_completions`, which TRL calls after every earlier
reward is known and before generating, so there is no lag (a sampler-based design lags >= 1
generation: the dataloader reads ahead). The dataloader still runs; it only ticks the clock.

- B = (per-process generation batch x processes) / num_generations; each prompt's copies are
  consecutive in the global list and process p takes its slice, as TRL's RepeatSampler would.
  Rank 0's selection is broadcast, and every process observes the same gathered rewards, so the
  predictor state is identical on every rank.
- Rewards: TRL's weighted sum over reward functions; a completion counts as a success when it is
  >= `success_threshold` (default 1.0; rewards need not be binary). Completions without a usable
  reward (None/NaN from every function, or +-inf from any: `training/rewards.py`) are not trials,
  are counted in the metrics' `nonfinite_rewards` and named in a `RewardWarning`; a prompt with
  none is recorded as `failed` and not observed; a generation with none at all stops training with
  one line, unless `missing_rewards="skip"` records it as failed and goes on.
- The run folder (default `<output_dir>/mpts`) is written by the mpts loop's `RunRecorder` (rank 0
  only): config.yaml, then parts with a manifest as the run goes (at each TRL checkpoint, and every
  few thousand rows or minute), and trace.parquet, metrics.parquet and summary.json when `train()`
  returns, so a generation costs what it adds, not a rewrite of the run so far.
- Checkpoints: each TRL checkpoint holds `mpts_selector.pt` (the selector state and the generation),
  and the run folder gets the matching mpts checkpoint; `trainer.train(resume_from_checkpoint=...)`
  restores the selector and continues the run folder, setting rows written after that checkpoint
  aside (never deleting them).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import ConfigDict, Field

from mpts.models.extras import import_extra
from mpts.training.acquisition import reference_role
from mpts.training.config import OneLineErrors, build_options
from mpts.training.embeddings import text_pool
from mpts.training.logs import DEFAULT_SUCCESS_THRESHOLD, successes_of
from mpts.training.recorder import RunRecorder, step_metrics, summary_record, trace_rows
from mpts.training.rewards import MissingRewards, usable_rewards
from mpts.training.run_dir import RunFolderError
from mpts.training.selector_factory import Fields, build_selector, plan_selector

trl = import_extra("trl", "trl")
datasets = import_extra("datasets", "trl")
accelerate_utils = import_extra("accelerate.utils", "trl")

SELECTOR_FILE = "mpts_selector.pt"
SELECTION_FIELDS = Fields("selection.predictor", "selection.predictor_options ({name})", "selection.rule",
                          "selection.rule_options ({name})")


class SelectionOptions(OneLineErrors):
    """How the adapter chooses prompts; unknown keys and bad values are one-line ValueErrors."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    error_prefix = "selection"

    predictor: str = "beta"
    predictor_options: dict[str, Any] = Field(default_factory=dict)
    rule: str = "thompson_target"
    rule_options: dict[str, Any] = Field(default_factory=dict)
    candidate_ratio: float = Field(4.0, ge=1.0, description="candidates per generation = ratio x B (capped at the dataset)")
    success_threshold: float = Field(DEFAULT_SUCCESS_THRESHOLD, allow_inf_nan=False,
                                     description="a completion succeeds when its weighted reward >= this")
    seed: int | None = Field(None, description="seed of the selector's random streams; None: GRPOConfig.seed")
    target_accuracy: float = Field(0.5, gt=0.0, le=1.0, description="recorded for `mpts report` (rollouts to target)")
    run_dir: str | None = Field(None, description="mpts run folder; None: <output_dir>/mpts")
    missing_rewards: MissingRewards = Field("error", description="a generation with no usable reward: 'error' "
                                            "stops training, 'skip' records it as failed and goes on")


class SelectiveGRPOTrainer(trl.GRPOTrainer):
    """`trl.GRPOTrainer` whose prompts are chosen by an mpts `Selector` (see the module doc)."""

    def __init__(self, *args, selection: SelectionOptions | dict[str, Any] | None = None, **kwargs):
        # every option is checked before TRL loads anything; each refusal is one line
        options = selection if isinstance(selection, SelectionOptions) else build_options(
            SelectionOptions, selection, "selection")
        plan = plan_selector(options.predictor, options.rule, predictor_options=options.predictor_options,
                             rule_options=options.rule_options, fields=SELECTION_FIELDS, trainer="TRL")
        super().__init__(*args, **kwargs)
        dataset = self.train_dataset
        if not isinstance(dataset, datasets.Dataset) or len(dataset) == 0:
            raise ValueError("SelectiveGRPOTrainer needs a non-empty map-style datasets.Dataset as train_dataset "
                             "(prompts are chosen by index)")
        self.selection = options
        seed = self.args.seed if options.seed is None else options.seed
        pool = text_pool([_prompt_text(p) for p in dataset["prompt"]])
        self.selector = build_selector(plan, pool, k=self.num_generations, seed=seed)
        self.mpts_dir = Path(options.run_dir) if options.run_dir else Path(self.args.output_dir) / "mpts"
        self.recorder = RunRecorder(self.mpts_dir)
        self._generation = 0  # generations completed (the trace's step of the next one)
        self._cumulative_rollouts = 0
        self._wall_before = 0.0  # wall seconds of the run before this train() call (a resume)
        self._captured_rewards: torch.Tensor | None = None
        self._clock = time.perf_counter()
        self._last_observed = self._clock

    # -- training ----------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if not resume_from_checkpoint:
            try:  # every rank checks before rank 0 writes anything (that is after the first broadcast)
                self.recorder.folder.check_new()
            except FileExistsError:
                raise FileExistsError(f"{self.mpts_dir} already holds an mpts run; resume from a checkpoint "
                                      "(resume_from_checkpoint=...) or choose another output_dir / run_dir") from None
        self._clock = self._last_observed = time.perf_counter()
        result = super().train(resume_from_checkpoint, *args, **kwargs)
        if self.accelerator.is_main_process and self._generation > 0:
            self._finish()
        return result

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._captured_rewards = rewards  # [global completions, reward functions], gathered over ranks
        return rewards

    def _generate_and_score_completions(self, inputs):
        if not self.model.training:  # evaluation: TRL's own batches, nothing observed
            return super()._generate_and_score_completions(inputs)
        step, k = self._generation, self.num_generations
        local, world = len(inputs), self.accelerator.num_processes
        batch_size = local * world // k
        if batch_size * k != local * world or batch_size < 1:
            raise ValueError(f"the generation batch ({local} x {world} processes) is not a multiple of "
                             f"num_generations={k}")
        size = self.selector.num_prompts
        if batch_size > size:
            raise ValueError(f"each generation needs {batch_size} distinct prompts but the dataset has {size}")
        candidates = self.selector.sample_candidates(min(size, math.ceil(self.selection.candidate_ratio * batch_size)), step)
        selection = self.selector.select(candidates, batch_size, step)
        rows = accelerate_utils.broadcast(selection.rows.to(self.accelerator.device), from_process=0).cpu()
        mine = rows.repeat_interleave(k)[self.accelerator.process_index * local:(self.accelerator.process_index + 1) * local]
        chosen = [self.train_dataset[int(i)] for i in mine]

        started = time.perf_counter()
        self._captured_rewards = None
        output = super()._generate_and_score_completions(chosen)
        rolled = time.perf_counter()

        per_func = self._captured_rewards.detach().cpu().double()  # [B x k, functions], NaN where None
        usable = torch.from_numpy(usable_rewards(per_func.numpy(), self.reward_func_names, step,
                                                 self.selection.missing_rewards,
                                                 "selection={'missing_rewards': 'skip'}"))
        weighted = torch.where(per_func.isfinite(), per_func, 0.0) * self.reward_weights.cpu().double().unsqueeze(0)
        rewards = weighted.sum(dim=1).view(batch_size, k)
        scored = usable.view(batch_size, k)
        successes = successes_of(rewards, self.selection.success_threshold, scored).float()
        trials = scored.sum(dim=1).float()
        failed = trials == 0
        columns = self.selector.prediction_columns(selection.posterior, successes, trials, step, failed)
        diagnostics = {}
        if bool((~failed).any()):
            diagnostics = self.selector.observe(rows[~failed], successes[~failed], trials[~failed], step)
        observed = time.perf_counter()
        self._cumulative_rollouts += batch_size * k  # unusable rollouts were generated all the same
        metrics = step_metrics(
            step, successes, trials, failed, rollouts=batch_size * k, cumulative_rollouts=self._cumulative_rollouts,
            wall_seconds=self._wall_before + observed - self._clock,
            seconds={**selection.seconds, "rollout": rolled - started, "observe": observed - rolled,
                     "train": started - self._last_observed},
            diagnostics=diagnostics, nonfinite_rewards=int((~usable).sum()),
            extra={"global_step": int(self.state.global_step)})
        if self.accelerator.is_main_process:
            if not (self.mpts_dir / "config.yaml").exists():
                self.recorder.folder.create(self._config_yaml(batch_size))
            self.recorder.add_step(step, trace_rows(step, rows, successes, trials, columns, self.selection.rule,
                                                    failed=failed), metrics)
        self._last_observed = time.perf_counter()  # the run folder's write is not training time
        self._generation += 1
        return output

    # -- the run folder ----------------------------------------------------------------------------
    def _config_yaml(self, batch_size: int) -> str:
        o = self.selection
        return yaml.safe_dump({
            "name": "trl", "source": "trl", "seed": self.selector.streams.seed, "k": self.num_generations,
            "batch_size": batch_size, "candidate_ratio": o.candidate_ratio,
            "success_threshold": o.success_threshold, "target_accuracy": o.target_accuracy,
            "predictor": {"name": o.predictor, **o.predictor_options},
            "acquisition": {"name": o.rule, **o.rule_options}}, sort_keys=False)

    def _generations_total(self) -> int:
        """Generations in this training run (progress.json): optimiser steps x accumulation / generate_every."""
        generate_every = self.args.steps_per_generation * self.num_iterations
        return max(self._generation, math.ceil(self.state.max_steps * self.args.gradient_accumulation_steps
                                               / generate_every))

    def _finish(self) -> None:
        o = self.selection
        self.recorder.finish(
            lambda trace, metrics: summary_record(
                config_name="trl", predictor=o.predictor, acquisition=o.rule, environment="trl",
                seed=self.selector.streams.seed, target_accuracy=o.target_accuracy,
                reference=reference_role(self.selector.rule), trace=trace, metrics=metrics),
            self.selector.predictor.state_dict(), None, self._generation, self._generations_total())

    # -- checkpoints -------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if not self.args.should_save or self._generation == 0:
            return
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        state = {"selector": self.selector.state_dict(), "generation": self._generation,
                 "cumulative_rollouts": self._cumulative_rollouts,
                 "wall_seconds": self._wall_before + time.perf_counter() - self._clock}
        # the run folder's parts and checkpoint first, then the file a resume starts from
        self.recorder.checkpoint(self._generation - 1, {"selector": state["selector"]}, self._generations_total())
        tmp = folder / (SELECTOR_FILE + ".tmp")
        torch.save(state, tmp)
        tmp.replace(folder / SELECTOR_FILE)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        folder = Path(checkpoint)
        if not (folder / SELECTOR_FILE).is_file():
            raise FileNotFoundError(f"checkpoint {folder} has no {SELECTOR_FILE}: it was not written by "
                                    "SelectiveGRPOTrainer, so the selector cannot resume from it")
        try:
            state = torch.load(folder / SELECTOR_FILE, weights_only=True)
            generation = int(state["generation"])
        except Exception as error:  # a truncated or foreign file
            raise ValueError(f"checkpoint {folder}: {SELECTOR_FILE} is unreadable ({error})") from None
        plan = None
        if self.accelerator.is_main_process:  # only rank 0 writes the run folder; check it before any change
            try:
                plan = self.recorder.folder.plan_resume(rollback_to=generation)
            except RunFolderError as error:
                raise ValueError(f"checkpoint {folder} continues the mpts run folder {self.mpts_dir}, which cannot "
                                 f"resume: {error}") from None
            if plan.step != generation - 1:
                raise ValueError(f"checkpoint {folder} is after generation {generation - 1}, but the mpts run folder "
                                 f"{self.mpts_dir} has its last checkpoint at generation {plan.step}; resume from the "
                                 "TRL checkpoint written with it, or set selection={'run_dir': ...} to that run's folder")
        self.selector.load_state_dict(state["selector"])
        if plan is not None:
            self.recorder.folder.apply(plan)
        self._generation = generation
        self._cumulative_rollouts = int(state.get("cumulative_rollouts", 0))
        self._wall_before = float(state.get("wall_seconds", 0.0))


def _prompt_text(prompt: Any) -> str:
    """A dataset prompt as text: a string, or a conversation's message contents joined."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return "\n".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in prompt)
    raise TypeError(f"dataset prompts must be strings or lists of messages, got {type(prompt).__name__}")
