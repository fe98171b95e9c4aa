"""The selection half of the verl adapter, importable without verl: choose B of C dataset rows,
observe verl's scored batch, write the mpts run folder.

verl keys a prompt by `extra_info["index"]`; so does mpts (the Selector's ids are those labels, in
dataset order, so a selector row is a dataset position). A rollout succeeds when its reward is
>= `success_threshold`; a prompt's k rollouts give (successes, trials). A rollout whose reward is
None, NaN or infinite is not a trial (`training/rewards.py`: counted in `nonfinite_rewards`,
warned about; a step with none usable is an error unless `mpts.missing_rewards=skip`). Steps are
mpts's, from 0: verl's global step minus one. The run folder is written by the loop's
`RunRecorder`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import yaml
from pydantic import Field

from mpts.models.base import PromptPool
from mpts.training.acquisition import reference_role
from mpts.models.options import StrictOptions
from mpts.training.config import ComponentConfig, OneLineErrors
from mpts.training.embeddings import text_pool
from mpts.training.recorder import RunRecorder, step_metrics, summary_record, trace_rows
from mpts.training.rewards import MissingRewards, NoUsableRewardError, usable_rewards
from mpts.training.run_dir import RunFolderError
from mpts.training.selector import Selection
from mpts.training.selector_factory import Fields, SelectorPlan, build_selector, plan_selector
from mpts.training.state_file import load_state, save_state


class VerlSelectionError(ValueError):
    """A verl setup or batch the adapter cannot select from; the message names what is wrong."""


def write_selector_state(state: dict[str, Any], path: Path) -> None:
    """The selector state saved beside verl's checkpoint: tensors and plain data, written atomically."""
    save_state(state, path)


def read_selector_state(path: Path) -> dict[str, Any]:
    """The selector state saved beside verl's checkpoint, read without running anything in it."""
    try:
        return load_state(path)
    except ValueError as error:  # damaged, or holding objects other than tensors and plain data
        raise VerlSelectionError(str(error)) from None


class SelectionConfig(OneLineErrors, StrictOptions):
    """The `mpts:` section of the verl config; a bad value is a one-line ValueError, also from Python."""

    error_prefix = "mpts"

    predictor: ComponentConfig = ComponentConfig(name="beta")
    acquisition: ComponentConfig = ComponentConfig(name="thompson_target")
    candidate_ratio: int = Field(8, ge=1, description="candidates per step = candidate_ratio x train batch")
    success_threshold: float = Field(1.0, description="a rollout succeeds when reward >= this")
    reward: str = Field("score", description="'score' (verl's token_level_scores summed) or a reward extra key")
    seed: int = 0
    out: str | None = Field(None, description="the mpts run folder; default <trainer.default_local_dir>/mpts")
    target_accuracy: float = Field(0.6, gt=0.0, le=1.0, description="recorded for `mpts report`")
    missing_rewards: MissingRewards = Field("error", description="a step with no usable (finite) reward: 'error' "
                                            "stops training, 'skip' records it as failed and goes on")


def read_selection_config(raw: dict[str, Any]) -> SelectionConfig:
    """Validate the `mpts:` section, component options included; one line naming each bad field."""
    try:
        options = SelectionConfig(**raw)
    except ValueError as error:  # already one line, "mpts: <field>: ..."
        raise VerlSelectionError(str(error)) from None
    _checked_plan(options)
    return options


def _checked_plan(options: SelectionConfig) -> SelectorPlan:
    """The checked predictor and rule of the `mpts:` section (a rule verl cannot serve refused)."""
    try:
        return plan_selector(options.predictor, options.acquisition, fields=Fields().prefixed("mpts."), trainer="verl")
    except ValueError as error:
        raise VerlSelectionError(str(error)) from None


def checked_labels(labels: list[Any], where: str) -> np.ndarray:
    """Prompt labels as an int64 or str array; refuses missing, None, mixed and all-equal ones."""
    missing = [i for i, label in enumerate(labels)
               if label is None or (isinstance(label, float) and math.isnan(label))]
    if missing:
        raise VerlSelectionError(f"{where}: extra_info['index'] is missing or None at row {missing[0]} "
                                 f"({len(missing)} rows); every prompt needs its own index")
    kinds = {type(label) for label in labels}
    if kinds <= {int, np.int64, np.int32} or kinds <= {str, np.str_}:
        array = np.asarray(labels)
    elif kinds <= {int, float, np.int64, np.float64} and all(float(x).is_integer() for x in labels):
        array = np.asarray(labels, dtype=np.float64).astype(np.int64)
    else:
        raise VerlSelectionError(f"{where}: extra_info['index'] must hold integers or strings, got "
                                 f"{', '.join(sorted(k.__name__ for k in kinds))}")
    if len(array) > 1 and bool(np.all(array == array[0])):
        raise VerlSelectionError(f"{where}: every row has extra_info['index'] == {array[0].item()!r}; give each "
                                 "prompt its own index (verl fills a missing one with 0)")
    return array


def batch_labels(infos: Any, where: str) -> np.ndarray:
    if infos is None:
        raise VerlSelectionError(f"{where} has no extra_info: mpts keys prompts by extra_info['index']")
    return checked_labels([info.get("index") if isinstance(info, dict) else None for info in infos], where)


class PromptSelection:
    """Chooses B of C rows per step, observes the scored batch, writes the run folder.

    One selection is pending at a time: `choose` refuses while the previous step's outcomes are
    unobserved, which catches a dataloader that reads ahead.
    """

    def __init__(self, options: SelectionConfig, labels: np.ndarray, batch_size: int, k: int, run_dir: Path,
                 texts: Sequence[str] | None = None):
        self.options, self.labels, self.batch_size, self.k = options, labels, int(batch_size), int(k)
        self.num_candidates = options.candidate_ratio * self.batch_size
        if self.num_candidates > len(labels):
            raise VerlSelectionError(f"candidate pool of {self.num_candidates} (mpts.candidate_ratio x "
                                     f"data.train_batch_size) exceeds the {len(labels)} training prompts")
        plan = _checked_plan(options)
        # with the prompt texts, predictors that use embeddings (gp) get them, computed on first use
        pool = text_pool(texts) if texts is not None else PromptPool(size=len(labels))
        self.selector = build_selector(plan, pool, k=self.k, seed=options.seed, ids=labels)
        self.recorder = RunRecorder(Path(run_dir))
        self.folder = self.recorder.folder
        self.pending: tuple[int, Selection, float] | None = None
        self.steps_done = 0  # steps observed; the next step is this one
        self.cumulative_rollouts = 0
        self.wall_seconds = 0.0
        self.row: tuple[int, pd.DataFrame, dict[str, Any], float] | None = None  # observed, not yet recorded

    # -- the run folder ------------------------------------------------------------------------
    def config_yaml(self, total_steps: int) -> str:
        options = self.options
        return yaml.safe_dump({
            "name": "verl", "seed": options.seed, "steps": int(total_steps), "batch_size": self.batch_size,
            "candidate_ratio": options.candidate_ratio, "k": self.k, "target_accuracy": options.target_accuracy,
            "success_threshold": options.success_threshold, "reward": options.reward,
            "env": {"name": "verl", "num_prompts": len(self.labels)},
            "predictor": {"name": options.predictor.name, **options.predictor.options},
            "acquisition": {"name": options.acquisition.name, **options.acquisition.options},
        }, sort_keys=False)

    def start(self, total_steps: int) -> None:
        try:
            self.folder.check_new()
            self.folder.create(self.config_yaml(total_steps))
        except FileExistsError:
            raise VerlSelectionError(f"mpts.out: {self.folder.root} already holds a run (or other files); continue "
                                     "that run with trainer.resume_mode=auto or set mpts.out to a new folder") from None
        except RunFolderError as error:
            raise VerlSelectionError(f"mpts.out: {error}") from None

    def state_dict(self) -> dict[str, Any]:
        if self.pending is not None:
            raise VerlSelectionError(f"step {self.pending[0]} was selected but not observed; cannot checkpoint")
        return {"steps_done": self.steps_done, "selector": self.selector.state_dict(),
                "cumulative_rollouts": self.cumulative_rollouts, "wall_seconds": self.wall_seconds}

    def checkpoint(self, total_steps: int) -> dict[str, Any]:
        """Record and flush the rows so far; returns the state to save with verl's checkpoint."""
        self.record()
        state = self.state_dict()
        self.recorder.checkpoint(self.steps_done - 1, {"selector": state["selector"]}, total_steps)
        return state

    def resume(self, state: dict[str, Any], steps_done: int) -> None:
        """Continue after `steps_done` steps from the state saved with verl's checkpoint; the run folder
        must hold exactly those steps' rows (later ones, from a crash, are set aside, never deleted).
        Everything is checked before anything changes."""
        if state.get("steps_done") != steps_done:
            raise VerlSelectionError(f"the selector state was saved after {state.get('steps_done')} steps, "
                                     f"verl resumes after {steps_done}")
        try:
            self.folder.lock()  # one writer: refused while another process writes this run folder
            plan = self.folder.plan_resume(rollback_to=steps_done)
        except RunFolderError as error:
            raise VerlSelectionError(f"mpts.out: {error}") from None
        if plan.step != steps_done - 1:
            raise VerlSelectionError(f"the mpts run folder {self.folder.root} has a checkpoint at step {plan.step} "
                                     f"but none at step {steps_done - 1}, where verl resumes; resume verl from "
                                     f"global_step_{plan.step + 1} or write to a new mpts.out")
        self.selector.load_state_dict(state["selector"])
        self.folder.apply(plan)
        self.steps_done, self.cumulative_rollouts = steps_done, int(state["cumulative_rollouts"])
        self.wall_seconds = float(state["wall_seconds"])

    def finish(self, total_steps: int) -> dict[str, Any]:
        """Write trace.parquet, metrics.parquet, summary.json and the final predictor."""
        self.record()
        options = self.options
        return self.recorder.finish(
            lambda trace, metrics: summary_record(
                config_name="verl", predictor=options.predictor.name, acquisition=options.acquisition.name,
                environment="verl", seed=options.seed, target_accuracy=options.target_accuracy,
                reference=reference_role(self.selector.rule), trace=trace, metrics=metrics),
            self.selector.predictor.state_dict(), None, self.steps_done, total_steps)

    # -- one step ------------------------------------------------------------------------------
    def choose(self) -> list[int]:
        """Dataset rows of the B prompts to generate for at the next step."""
        step = self.steps_done
        if self.pending is not None:
            raise VerlSelectionError(f"the prompts of step {self.pending[0] + 1} were requested before step "
                                     f"{self.pending[0]}'s outcomes were observed: the dataloader reads ahead "
                                     "(data.dataloader_num_workers must be 0)")
        self.record()
        started = time.perf_counter()
        candidates = self.selector.sample_candidates(self.num_candidates, step)
        selection = self.selector.select(candidates, self.batch_size, step)
        self.pending = (step, selection, started)
        return selection.rows.tolist()

    def observe(self, infos: Any, rewards: np.ndarray, step: int) -> None:
        """Fold one step's rollouts (extra_info per rollout, reward per rollout) into the predictor.

        Everything is checked before the predictor changes: a refused batch leaves it as it was.
        """
        if self.pending is None or self.pending[0] != step:
            raise VerlSelectionError(f"verl's batch for step {step} arrived but the pending selection is for step "
                                     f"{None if self.pending is None else self.pending[0]}")
        _, selection, started = self.pending
        observed_at = time.perf_counter()
        labels = batch_labels(infos, "verl's batch")
        try:
            rewards = np.asarray(rewards, dtype=np.float64)  # None -> NaN
        except (TypeError, ValueError) as error:
            raise VerlSelectionError(f"reward {self.options.reward!r} holds a value that is not a number ({error})") from None
        if rewards.shape != labels.shape:
            raise VerlSelectionError(f"verl's batch has {len(labels)} rollouts but {rewards.size} rewards")
        position = self.positions_in(selection, labels)
        try:
            usable = usable_rewards(rewards[:, None], [self.options.reward], step, self.options.missing_rewards,
                                    "mpts.missing_rewards=skip")
        except NoUsableRewardError as error:
            raise VerlSelectionError(str(error)) from None
        wins = torch.from_numpy(((rewards >= self.options.success_threshold) & usable).astype(np.float32))
        successes = torch.zeros(self.batch_size).index_add_(0, position, wins)
        trials = torch.zeros(self.batch_size).index_add_(0, position, torch.from_numpy(usable.astype(np.float32)))
        failed = trials == 0
        columns = self.selector.prediction_columns(selection.posterior, successes, trials, step, failed)
        diagnostics = {}
        if bool((~failed).any()):
            diagnostics = self.selector.observe(np.asarray(selection.ids)[~failed.numpy()], successes[~failed],
                                                trials[~failed], step)
        observe_seconds = time.perf_counter() - observed_at
        # the trace's prompt_id is the label where labels are integers, else the dataset row
        ids = torch.as_tensor(selection.ids) if np.asarray(selection.ids).dtype.kind in "iu" else selection.rows
        trace = trace_rows(step, ids.long(), successes, trials, columns, self.selector.rule.name, failed=failed)
        self.cumulative_rollouts += len(rewards)  # unusable rollouts were generated all the same
        metrics = step_metrics(
            step, successes, trials, failed, rollouts=len(rewards), cumulative_rollouts=self.cumulative_rollouts,
            wall_seconds=math.nan,  # set by `record`, when the step's training has ended
            seconds={**selection.seconds, "rollout": observed_at - started - sum(selection.seconds.values()),
                     "observe": observe_seconds, "train": 0.0},
            diagnostics=diagnostics, nonfinite_rewards=int((~usable).sum()))
        self.pending, self.steps_done = None, step + 1
        self.row = (step, trace, metrics, started)

    def add_train_seconds(self, seconds: float) -> None:
        if self.row is not None:
            self.row[2]["train_seconds"] += seconds

    def record(self) -> None:
        """Add the observed step's row to the run folder (its wall time ends here)."""
        if self.row is None:
            return
        step, trace, metrics, started = self.row
        self.wall_seconds += time.perf_counter() - started
        self.recorder.add_step(step, trace, {**metrics, "wall_seconds": self.wall_seconds})
        self.row = None

    def positions_in(self, selection: Selection, labels: np.ndarray) -> torch.Tensor:
        """Each rollout's position in the selection; refuses rollouts of prompts not selected and
        selected prompts without a rollout."""
        try:
            rows = self.selector.rows(labels, "observe")
        except (IndexError, TypeError, ValueError) as error:
            raise VerlSelectionError(f"verl's batch: {error}") from None
        order = torch.argsort(selection.rows)
        chosen = selection.rows[order]
        where = torch.searchsorted(chosen, rows).clamp(max=len(chosen) - 1)
        foreign = chosen[where] != rows
        if foreign.any():
            raise VerlSelectionError(f"verl's batch holds prompt {labels[foreign.numpy()][0].item()!r}, which mpts "
                                     "did not select for this step")
        position = order[where]
        unseen = torch.bincount(position, minlength=self.batch_size) == 0
        if unseen.any():
            label = np.asarray(selection.ids)[unseen.numpy()][0]
            raise VerlSelectionError(f"prompt {label.item()!r} was selected but verl's batch has no rollout of it")
        return position
