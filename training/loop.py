"""The common loop: one readable function for every environment, predictor and rule.

Per step::

    selector: sample candidates -> predictor.predict -> rule.select -> env.rollout
           -> trace rows (the prediction made BEFORE the outcome, and the outcome)
           -> selector.observe -> env.train_on -> evaluate -> metrics -> checkpoint

Every run is thereby also a prequential (predict-then-observe) calibration experiment. The
selector's random streams are keyed by (seed, stream, step), so arms of an ablation with the same
seed see the same candidates, and the environment's rollout noise, at every step.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyro
import torch

from mpts.training.acquisition import Acquisition, reference_role, sample_candidates
from mpts.training.config import ConfigError, RunConfig, config_to_yaml, parse_config_text, validate_config
from mpts.training.diagnostics import TrainingHistory, eligible_candidates, trained_accuracy
from mpts.training.environments.base import Environment, Outcomes, get_environment_class
from mpts.training.memory import check_fits, run_need
from mpts.training.recorder import RunRecorder, step_metrics, summary_record, trace_rows
from mpts.training.run_dir import RunFolder  # noqa: F401  (tests patch loop.RunFolder)
from mpts.training.selector import Selector
from mpts.training.selector_factory import build_selector, plan_selector
from mpts.training.threads import intra_op_threads

ProgressCallback = Callable[[int, int, dict[str, Any]], None]


def build_environment(config: RunConfig, run_dir: Path | None) -> Environment:
    cls = get_environment_class(config.env.name)
    return cls(config.env.with_options(cls.Options), seed=config.seed, run_dir=run_dir)


class StepTimer:
    """Accumulates wall seconds per phase of a step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def rollout_in_chunks(env: Environment, ids: torch.Tensor, batch_size: int, k: int) -> tuple[Outcomes, torch.Tensor]:
    """DAPO dynamic sampling: roll out chunks of B until B informative groups are kept.

    Every rollout spent counts; groups beyond the first B informative ones are not trained on.
    """
    parts, kept_so_far = [], 0
    for start in range(0, ids.shape[0], batch_size):
        chunk = env.rollout(ids[start:start + batch_size], k)
        parts.append(chunk)
        kept_so_far += int(chunk.informative.sum())
        if kept_so_far >= batch_size:
            break
    outcomes = Outcomes.cat(parts)
    kept = outcomes.informative & (torch.cumsum(outcomes.informative.long(), 0) <= batch_size)
    return outcomes, kept


def posterior_draws(selector: Selector, env: Environment, step: int, num_prompts: int,
                    num_draws: int = 500) -> pd.DataFrame | None:
    """Draws of p for a fixed sample of prompts from the final predictor (for ArviZ exports)."""
    num_prompts = min(num_prompts, env.pool.size)
    if num_prompts == 0:
        return None
    generator = selector.streams.generator("trace", step)
    ids = sample_candidates(env.pool.size, num_prompts, generator).sort().values
    draws = selector.predict(ids, step).sample(num_draws, generator)  # [draws, prompts]
    truth = env.true_success(ids)
    frame = pd.DataFrame({
        "prompt_id": ids.repeat_interleave(num_draws).numpy().astype(np.int64),
        "draw": torch.arange(num_draws).repeat(num_prompts).numpy().astype(np.int64),
        "p": draws.T.reshape(-1).double().numpy(),
    })
    frame["true_p"] = truth.repeat_interleave(num_draws).double().numpy() if truth is not None else np.nan
    return frame


def summarize(config: RunConfig, rule: Acquisition, trace: pd.DataFrame, metrics: pd.DataFrame,
              initial_evals: dict[str, float]) -> dict[str, Any]:
    """summary.json of a loop run (`recorder.summary_record`: the same fields for every way in)."""
    return summary_record(config_name=config.name, predictor=config.predictor.name,
                          acquisition=config.acquisition.name, environment=config.env.name, seed=config.seed,
                          target_accuracy=config.target_accuracy, reference=reference_role(rule),
                          trace=trace, metrics=metrics, initial_evals=initial_evals)


@contextmanager
def predictor_failures(config: RunConfig, step: int):
    """A predictor that diverges (non-finite loss or parameters) stops the run with one line
    naming the predictor, the step and its options, not a multi-line Pyro trace."""
    try:
        yield
    except (FloatingPointError, ValueError) as error:
        what = " ".join(str(error).split())[:160]
        raise ValueError(f"predictor {config.predictor.name} failed at step {step} ({what}); its options "
                         f"{config.predictor.options or '(defaults)'} may be too aggressive for this run, "
                         f"e.g. a smaller predictor.lr") from None


def check_checkpoint_fits(saved: dict[str, Any], config: RunConfig, path: Path | None) -> None:
    """A checkpoint written by another config (another predictor, pool, seed ...) is refused by name."""
    written_by = saved.get("config")
    if written_by is None:  # older checkpoints: loading into the built components checks the shapes
        return
    current = config.model_dump(mode="json")
    differ = [key for key in current if key != "steps" and written_by.get(key) != current[key]]
    if differ:
        key = differ[0]
        raise ValueError(f"checkpoint {path} was written by another config ({key}: {written_by.get(key)!r} there, "
                         f"{current[key]!r} in config.yaml); nothing was changed")


def _check_plugins_trusted(raw: Any, where: Path, trusted: tuple[str, ...]) -> None:
    """Importing a plugin runs its code; a run folder may come from anyone, so its config.yaml
    may only name plugins the user named too."""
    named = raw.get("plugins") if isinstance(raw, dict) else None
    if named is None:
        return
    if not isinstance(named, list) or not all(isinstance(m, str) for m in named):
        raise ValueError(f"{where}: plugins must be a list of module names")
    untrusted = [m for m in named if m not in trusted]
    if untrusted:
        flags = " ".join(f"--plugin {m}" for m in untrusted)
        raise ValueError(f"{where} names plugin module(s) {', '.join(untrusted)}, and importing a module runs "
                         f"its code; a run folder is data, so resume it with {flags} if you trust them")


def _saved_config(folder: RunFolder, trusted_plugins: tuple[str, ...]) -> RunConfig:
    """The config a resumed run was started with; a damaged config.yaml is one line naming it.
    Takes the folder's write lock first: a second writer is refused before it reads anything a
    writer may change."""
    source = folder.root / "config.yaml"
    try:
        text = folder.config_yaml()  # first: a folder that is not a run is named as such
    except UnicodeDecodeError as error:
        raise ConfigError(f"{source} is not UTF-8 text (byte offset {error.start})") from None
    folder.lock()
    raw = parse_config_text(text, str(source), empty_ok=False)
    _check_plugins_trusted(raw, source, trusted_plugins)
    return validate_config(raw)


def run(config: RunConfig | None, out_dir: Path | str, *, resume: bool = False, rollback_to: int | None = None,
        progress: ProgressCallback | None = None, trusted_plugins: Sequence[str] = ()) -> dict[str, Any]:
    """Run (or resume) one configuration into `out_dir`; returns the summary.

    Everything is checked before the folder is touched: a new run's folder is created only once
    its environment and predictor are built; a resume verifies the parts, the checkpoint and that
    the checkpoint fits the config before it sets any surplus part aside (see `RunFolder`). The
    folder's write lock is held from its creation (or before a resume plans) until this returns.

    A resumed folder's `config.yaml` is data: the plugin modules it names are imported only when
    the caller trusts them (`trusted_plugins`, or the plugins of the `config` passed in).
    """
    recorder = RunRecorder(Path(out_dir))
    try:
        return _run_in(recorder, config, resume=resume, rollback_to=rollback_to, progress=progress,
                       trusted_plugins=tuple(config.plugins) if config is not None else tuple(trusted_plugins))
    finally:
        recorder.folder.unlock()


def _run_in(recorder: RunRecorder, config: RunConfig | None, *, resume: bool, rollback_to: int | None,
            progress: ProgressCallback | None, trusted_plugins: tuple[str, ...]) -> dict[str, Any]:
    folder = recorder.folder
    if resume:
        config = _saved_config(folder, trusted_plugins)
        plan = folder.plan_resume(rollback_to)
        saved = plan.state
        if saved is not None:
            check_checkpoint_fits(saved, config, plan.checkpoint)
    else:
        if rollback_to is not None:
            raise ValueError("--rollback-to goes with --resume RUN_DIR")
        folder.check_new()
        saved = None

    check_fits(run_need(config), "this run")
    torch.manual_seed(config.seed)  # SVI-based predictors draw from the global RNG
    pyro.set_rng_seed(config.seed)
    env = build_environment(config, folder.root)
    try:
        selector = build_selector(plan_selector(config.predictor, config.acquisition), env.pool,
                                  k=config.k, seed=config.seed)
        if config.num_candidates > env.pool.size:
            raise ValueError(f"candidate pool of {config.num_candidates} (candidate_ratio x batch_size) "
                             f"exceeds the {env.pool.size} prompts available")
        if config.num_candidates + config.exclusion_window * config.batch_size > env.pool.size:
            raise ValueError(f"exclusion_window={config.exclusion_window}: {config.exclusion_window} steps x "
                             f"{config.batch_size} trained prompts + {config.num_candidates} candidates exceed "
                             f"the {env.pool.size} prompts available")
        if saved is not None:
            try:
                selector.load_state_dict(saved["selector"])
                env.load_state_dict(saved["env"])
            except Exception as error:
                raise ValueError(f"checkpoint {plan.checkpoint} does not fit this run: {error}") from None
        if resume:
            folder.apply(plan)
        else:
            folder.create(config_to_yaml(config))
        rule = selector.rule
        B, C, k = config.batch_size, config.num_candidates, config.k
        history = TrainingHistory(env.pool.size)

        if saved is None:
            start, cumulative, wall = 0, 0, 0.0
            initial_evals = env.evaluate_metrics()
        else:
            torch.set_rng_state(saved["torch_rng"])
            start, cumulative, wall = saved["step"] + 1, saved["cumulative_rollouts"], saved["wall_seconds"]
            initial_evals = saved.get("initial_evals", {"eval_accuracy": saved["initial_eval"]})
            if "history" in saved:
                history.load_state_dict(saved["history"])

        for step in range(start, config.steps):
            step_start = time.perf_counter()
            timer = StepTimer()
            if config.exclusion_window:
                rows = eligible_candidates(history, step, config.exclusion_window, C,
                                           selector.streams.generator("candidates", step))
                candidates = selector.id_map.ids(rows)
            else:
                candidates = selector.sample_candidates(C, step)
            truth = env.true_success(candidates) if rule.needs_truth else None
            with intra_op_threads(config.predictor_threads), predictor_failures(config, step):
                selection = selector.select(candidates, B, step, truth=truth)
            timer.seconds.update(selection.seconds)
            env.use_generator(selector.streams.generator("environment", step))
            with timer("rollout"):
                if rule.rolls_out_all:
                    outcomes, kept = rollout_in_chunks(env, selection.rows, B, k)
                else:
                    outcomes = env.rollout(selection.rows, k)
                    kept = ~outcomes.failed
            rolled = torch.arange(outcomes.ids.shape[0])
            with intra_op_threads(config.predictor_threads):
                columns = selector.prediction_columns(selection.posterior.take(rolled), outcomes.successes,
                                                      outcomes.trials, step, outcomes.failed)
            trace = trace_rows(step, outcomes.ids, outcomes.successes, outcomes.trials, columns, rule.name,
                               kept=kept, failed=outcomes.failed, true_p=outcomes.true_p)

            ok = ~outcomes.failed
            with timer("observe"), intra_op_threads(config.predictor_threads), predictor_failures(config, step):
                diagnostics = (selector.observe(outcomes.ids[ok], outcomes.successes[ok], outcomes.trials[ok], step)
                               if bool(ok.any()) else {})
            with timer("train"):
                train_info = env.train_on(outcomes.take(kept)) if bool(kept.any()) else {}
            spread = history.record(step, outcomes.ids[kept & ok],
                                       outcomes.greedy_solved[ok] if outcomes.greedy_solved is not None else None)
            evaluate_now = (step + 1) % config.eval_every == 0 or step == config.steps - 1
            evals = dict.fromkeys(initial_evals, float("nan"))
            evals["trained_accuracy"] = float("nan")
            with timer("eval"):
                if evaluate_now:
                    evals.update(env.evaluate_metrics())
                    evals["trained_accuracy"] = trained_accuracy(history, env, step + 1 - config.eval_every)

            spent = int(outcomes.trials.sum())  # failed prompts still cost their rollouts
            cumulative += spent
            wall += time.perf_counter() - step_start
            metrics = step_metrics(
                step, outcomes.successes, outcomes.trials, outcomes.failed, rollouts=spent,
                cumulative_rollouts=cumulative, wall_seconds=wall,
                seconds={**timer.seconds, **{key[:-len("_seconds")]: float(value) for key, value
                                             in outcomes.info.items() if key.endswith("_seconds")}},
                diagnostics=diagnostics,
                extra={**evals, **spread, **{f"train_{key}": float(value) for key, value in train_info.items()}})
            recorder.add_step(step, trace, metrics)
            if (step + 1) % config.checkpoint_every == 0 or step == config.steps - 1:
                recorder.checkpoint(step, {
                    "selector": selector.state_dict(), "env": env.state_dict(),
                    "torch_rng": torch.get_rng_state(),  # environments (e.g. the LM) may draw from it
                    "cumulative_rollouts": cumulative, "wall_seconds": wall,
                    "initial_eval": initial_evals["eval_accuracy"], "initial_evals": initial_evals,
                    "history": history.state_dict(), "config": config.model_dump(mode="json"),
                }, config.steps)
            if progress is not None:
                progress(step + 1, config.steps, metrics)

        draws = posterior_draws(selector, env, config.steps, config.posterior_draws_prompts)
        summary = recorder.finish(lambda trace, metrics: summarize(config, rule, trace, metrics, initial_evals),
                                  selector.predictor.state_dict(), draws, config.steps, config.steps)
        return summary
    finally:
        env.close()
