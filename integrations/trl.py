"""TRL adapter: any mpts predictor and acquisition rule choose the prompts of TRL's GRPOTrainer.

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
  >= `success_threshold` (default 1.0; rewards need not be binary). Completions no function could
  score (all None) are not trials; a prompt with none is recorded as `failed` and not observed.
- The run folder (default `<output_dir>/mpts`) holds config.yaml, trace.parquet, metrics.parquet
  and summary.json in mpts's schema, rewritten after every generation (rank 0 only).
- Checkpoints: the selector state and the rows so far are saved into each TRL checkpoint
  (`mpts_selector.pt`, `mpts_trace.parquet`, `mpts_metrics.parquet`) and restored with
  `trainer.train(resume_from_checkpoint=...)`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml
from pydantic import ConfigDict, Field

from mpts.inference.scoring import run_summary
from mpts.models.extras import import_extra
from mpts.models.registry import get_predictor_class
from mpts.training.acquisition import get_acquisition_class, reference_role
from mpts.training.config import OneLineErrors, build_options
from mpts.training.embeddings import text_pool
from mpts.training.logs import DEFAULT_SUCCESS_THRESHOLD, successes_of
from mpts.training.run_dir import TRACE_SCHEMA, _write_parquet, write_json
from mpts.training.selector import Selector

trl = import_extra("trl", "trl")
datasets = import_extra("datasets", "trl")
accelerate_utils = import_extra("accelerate.utils", "trl")

SELECTOR_FILE = "mpts_selector.pt"
TRACE_FILE = "mpts_trace.parquet"
METRICS_FILE = "mpts_metrics.parquet"


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


class SelectiveGRPOTrainer(trl.GRPOTrainer):
    """`trl.GRPOTrainer` whose prompts are chosen by an mpts `Selector` (see the module doc)."""

    def __init__(self, *args, selection: SelectionOptions | dict[str, Any] | None = None, **kwargs):
        # every option is checked before TRL loads anything; each refusal is one line
        options = selection if isinstance(selection, SelectionOptions) else build_options(
            SelectionOptions, selection, "selection")
        predictor_cls, rule_cls = _component(get_predictor_class, options, "predictor"), _component(
            get_acquisition_class, options, "rule")
        if rule_cls.needs_truth or rule_cls.rolls_out_all:
            raise ValueError(f"selection.rule: acquisition {options.rule!r} cannot drive TRL: it needs the true success "
                             "rates or rolls out every candidate; use a rule that picks B of C")
        predictor_options = build_options(predictor_cls.Options, options.predictor_options,
                                          f"selection.predictor_options ({options.predictor})")
        rule_options = build_options(rule_cls.Options, options.rule_options, f"selection.rule_options ({options.rule})")
        super().__init__(*args, **kwargs)
        dataset = self.train_dataset
        if not isinstance(dataset, datasets.Dataset) or len(dataset) == 0:
            raise ValueError("SelectiveGRPOTrainer needs a non-empty map-style datasets.Dataset as train_dataset "
                             "(prompts are chosen by index)")
        self.selection = options
        seed = self.args.seed if options.seed is None else options.seed
        pool = text_pool([_prompt_text(p) for p in dataset["prompt"]])
        predictor = predictor_cls(pool, predictor_options, seed=seed)
        rule = rule_cls(rule_options)
        self.selector = Selector(predictor, rule, k=self.num_generations, seed=seed)
        self.mpts_dir = Path(options.run_dir) if options.run_dir else Path(self.args.output_dir) / "mpts"
        self._generation = 0  # generations completed (the trace's step of the next one)
        self._mpts_trace: list[pd.DataFrame] = []
        self._mpts_metrics: list[dict[str, Any]] = []
        self._captured_rewards: torch.Tensor | None = None
        self._clock = time.perf_counter()
        self._last_observed = self._clock

    # -- training ----------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if not resume_from_checkpoint and (self.mpts_dir / "trace.parquet").exists():
            raise FileExistsError(f"{self.mpts_dir} already holds an mpts trace; resume from a checkpoint "
                                  "(resume_from_checkpoint=...) or choose another output_dir / run_dir")
        self._clock = self._last_observed = time.perf_counter()
        return super().train(resume_from_checkpoint, *args, **kwargs)

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

        per_func = self._captured_rewards.detach().cpu()
        rewards = (per_func * self.reward_weights.cpu().unsqueeze(0)).nansum(dim=1).view(batch_size, k)
        scored = ~torch.isnan(per_func).all(dim=1).view(batch_size, k)
        successes = successes_of(rewards, self.selection.success_threshold, scored).float()
        trials = scored.sum(dim=1).float()
        failed = trials == 0
        columns = self.selector.prediction_columns(selection.posterior, successes, trials, step, failed)
        diagnostics = {}
        if bool((~failed).any()):
            diagnostics = self.selector.observe(rows[~failed], successes[~failed], trials[~failed], step)
        observed = time.perf_counter()
        self._record(step, rows, successes, trials, failed, columns, selection.seconds, diagnostics,
                     rollout=rolled - started, observe=observed - rolled, train=started - self._last_observed)
        self._last_observed = observed
        self._generation += 1
        return output

    # -- the run folder ----------------------------------------------------------------------------
    def _record(self, step, rows, successes, trials, failed, columns, seconds, diagnostics, *, rollout, observe, train):
        trace = pd.DataFrame({"step": step, "prompt_id": rows.numpy(), "successes": successes.long().numpy(),
                              "trials": trials.long().numpy(), **columns, "selected_by": self.selection.rule,
                              "kept": (~failed).numpy(), "failed": failed.numpy(), "true_p": np.nan})
        good = ~failed
        informative = ((successes > 0) & (successes < trials))[good]
        previous = self._mpts_metrics[-1]["cumulative_rollouts"] if self._mpts_metrics else 0
        rollouts = int(rows.shape[0] * self.num_generations)
        elbo = diagnostics.get("elbo")
        self._mpts_trace.append(trace)
        self._mpts_metrics.append({
            "step": step, "rollouts": rollouts, "cumulative_rollouts": previous + rollouts,
            "prompts_rolled_out": int(rows.shape[0]),
            "effective_ratio": float(informative.float().mean()) if bool(good.any()) else float("nan"),
            "train_accuracy": float(successes[good].sum() / trials[good].sum()) if bool(good.any()) else float("nan"),
            "eval_accuracy": float("nan"), "wall_seconds": time.perf_counter() - self._clock,
            "predict_seconds": seconds.get("predict", float("nan")), "select_seconds": seconds.get("select", float("nan")),
            "rollout_seconds": rollout, "observe_seconds": observe, "train_seconds": train,
            "elbo": float(np.mean(elbo)) if elbo is not None and len(np.atleast_1d(elbo)) else float("nan"),
            "global_step": int(self.state.global_step),
        })
        if self.accelerator.is_main_process:
            self._write_run_folder()

    def _write_run_folder(self) -> None:
        self.mpts_dir.mkdir(parents=True, exist_ok=True)
        o = self.selection
        config = {"name": "trl", "source": "trl", "seed": self.selector.streams.seed, "k": self.num_generations,
                  "batch_size": int(self._mpts_metrics[0]["prompts_rolled_out"]), "candidate_ratio": o.candidate_ratio,
                  "success_threshold": o.success_threshold, "target_accuracy": o.target_accuracy,
                  "predictor": {"name": o.predictor, **o.predictor_options},
                  "acquisition": {"name": o.rule, **o.rule_options}}
        (self.mpts_dir / "config.yaml.tmp").write_text(yaml.safe_dump(config, sort_keys=False))
        (self.mpts_dir / "config.yaml.tmp").replace(self.mpts_dir / "config.yaml")
        trace, metrics = self._tables()
        _write_parquet(trace, self.mpts_dir / "trace.parquet")
        _write_parquet(metrics, self.mpts_dir / "metrics.parquet")
        # the same per-run numbers as the mpts loop writes (one summary path: scoring.run_summary)
        write_json(self.mpts_dir / "summary.json", {
            "predictor": o.predictor, "acquisition": o.rule, "seed": self.selector.streams.seed,
            "reference": reference_role(self.selector.rule), "initial_eval_accuracy": float("nan"),
            **run_summary(trace.to_pandas(), metrics.to_pandas(), o.target_accuracy)})

    def _tables(self) -> tuple[pa.Table, pa.Table]:
        trace = pd.concat(self._mpts_trace, ignore_index=True) if self._mpts_trace else pd.DataFrame(columns=TRACE_SCHEMA.names)
        return (pa.Table.from_pandas(trace, schema=TRACE_SCHEMA, preserve_index=False),
                pa.Table.from_pandas(pd.DataFrame(self._mpts_metrics), preserve_index=False))

    # -- checkpoints -------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if not self.args.should_save:
            return
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        trace, metrics = self._tables()
        _write_parquet(trace, folder / TRACE_FILE)
        _write_parquet(metrics, folder / METRICS_FILE)
        torch.save({"selector": self.selector.state_dict(), "generation": self._generation}, folder / SELECTOR_FILE)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        folder = Path(checkpoint)
        missing = [name for name in (SELECTOR_FILE, TRACE_FILE, METRICS_FILE) if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"checkpoint {folder} has no {', '.join(missing)}: it was not written by "
                                    "SelectiveGRPOTrainer, so the selector cannot resume from it")
        try:
            state = torch.load(folder / SELECTOR_FILE, weights_only=True)
            trace = pq.read_table(folder / TRACE_FILE).to_pandas()
            metrics = pq.read_table(folder / METRICS_FILE).to_pandas()
        except Exception as error:  # a truncated or foreign file
            raise ValueError(f"checkpoint {folder}: the mpts selector files are unreadable ({error})") from None
        self.selector.load_state_dict(state["selector"])
        self._generation = int(state["generation"])
        self._mpts_trace = [trace] if len(trace) else []
        self._mpts_metrics = metrics.to_dict("records")


def _component(lookup, options: SelectionOptions, field: str):
    """The registered class named by `options.<field>`, or a one-line ValueError listing the known names."""
    try:
        return lookup(getattr(options, field))
    except KeyError as error:
        raise ValueError(f"selection.{field}: {error.args[0]}") from None


def _prompt_text(prompt: Any) -> str:
    """A dataset prompt as text: a string, or a conversation's message contents joined."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return "\n".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in prompt)
    raise TypeError(f"dataset prompts must be strings or lists of messages, got {type(prompt).__name__}")
