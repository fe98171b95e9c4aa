"""The LM environment: GRPO on a causal LM, rollouts from a backend, rewards from a task's verifier.

    pool      = the task's training problems (texts = prompts, clusters = difficulty levels)
    rollout   = sync weights to the backend if the policy changed -> k samples per prompt -> grade
    train_on  = one GRPO update on the groups of the last rollouts (kept here, keyed by prompt id)
    evaluate  = greedy (or sampled) accuracy on held-out problems of the same task

The policy is either a local Hugging Face checkpoint (`model: /path`, nothing is downloaded) or
the tiny character-level Qwen2 of `tiny_lm`, built from `seed`, optionally warmed up with a short
supervised phase, and saved to `run_dir/policy` (weights + tokenizer) so vLLM can load it.
Sampling seeds are derived from call counters, so a resumed run draws what the original would have.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor

from mpts.inference.schema import LEVELS_FILE
from mpts.models.base import PromptPool, check_prompt_ids
from mpts.training.embeddings import EMBEDDING_DIM, text_pool
from mpts.training.run_dir import write_json
from ..base import Environment, EnvironmentOptions, Outcomes
from .grpo import GRPOConfig, GRPOTrainer, Sequences, group_advantages
from .rollout import RolloutBackend, SamplingConfig, make_backend
from .tasks import Problem, Task, get_task, get_task_class
from .tiny_lm import TinyModelOptions, build_char_tokenizer, build_tiny_model, save_model, supervised_warmup

logger = logging.getLogger(__name__)

POLICY_DIR = "policy"
_FINGERPRINT_FILE = "mpts_init.json"


class LMOptions(EnvironmentOptions):
    task: str = Field("arithmetic", description="task name: arithmetic, countdown, math_file, or a registered one")
    task_options: dict[str, Any] = Field(default_factory=dict, description="the task's own options")
    model: str | None = Field(None, description="local HF checkpoint directory; null: the tiny char-level Qwen2")
    tiny: TinyModelOptions = Field(default_factory=TinyModelOptions, description="shape of the tiny model")
    chat_template: bool = Field(False, description="wrap prompts in the tokenizer's chat template (instruct models)")
    backend: Literal["hf", "vllm", "auto"] = Field("hf", description="rollout engine; auto: vLLM when it imports, "
                                                 "else HF generate (with a log line saying so)")
    num_prompts: int = Field(1024, ge=1, description="training prompts in the pool")
    eval_prompts: int = Field(128, ge=1, description="held-out problems for evaluate()")
    eval_samples: int = Field(4, ge=0, description="samples per eval problem at the rollout temperature for "
                              "the sampled accuracy (0: greedy accuracy only)")
    eval_target: Literal["greedy", "sampled"] = Field("greedy", description="which held-out accuracy is "
                                                      "`eval_accuracy` (targets, summaries, reports)")
    eval_by_level: bool = Field(False, description="also report held-out accuracy per difficulty level (the "
                                "pool's clusters): eval_accuracy_greedy_level<L>, eval_accuracy_sampled_level<L>")
    greedy_probe: bool = Field(True, description="also decode each rolled-out batch greedily, for the share of "
                               "the batch already solved greedily (a diagnostic; one greedy pass over B prompts)")
    max_new_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, gt=0.0, description="rollout sampling temperature")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig, description="the GRPO update's options (grpo.py)")
    warmup_sft_steps: int = Field(0, ge=0, description="supervised steps on reference answers before GRPO")
    warmup_sft_batch: int = Field(64, ge=1)
    warmup_sft_lr: float = Field(3e-3, gt=0.0)
    warmup_teacher_error: float = Field(0.0, ge=0.0, le=1.0, description="share of warm-up examples taught the "
                                        "task's flawed answer (its systematic slip, e.g. arithmetic's leading "
                                        "zero) instead of the right one")
    warmup_teacher_error_by_level: dict[int, float] | None = Field(
        None, description="the teacher's slip rate per difficulty level of the warm-up problem (the warm-up task's "
        "level, e.g. arithmetic's digits - 1 with level: digits), e.g. {1: 0.0, 2: 0.9}: a slip that depends on the "
        "problem, so some levels start clean (always solved) and others mostly slipped; levels not listed use "
        "warmup_teacher_error; null: warmup_teacher_error on every level")
    warmup_cache: str | None = Field(None, description="folder of warmed-up starting policies, one per set of "
                                     "settings that determines them: runs that share those (an ablation's arms "
                                     "at one seed) warm up once; a relative path is taken from the run folder "
                                     "(../.warmup-cache: shared by the runs side by side); null: no sharing")
    warmup_task_options: dict[str, Any] | None = Field(None, description="the task's options for the warm-up's "
                                                       "problems when they differ from the pool's (supervised data "
                                                       "easier than the RL pool, as in practice); null: task_options")
    warmup_sft_problems: int = Field(4096, ge=1, description="problems drawn for the warm-up (eval problems are "
                                     "dropped; pool ones may recur)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="compute dtype; auto: bf16 on CUDA")
    generation_batch: int = Field(64, ge=1, description="prompts per HF generate call")
    gpu_memory_utilization: float = Field(0.2, gt=0.0, le=1.0, description="vLLM's share of device memory")
    max_model_len: int | None = Field(None, ge=16, description="vLLM context length; null: the model's own")

    @field_validator("warmup_teacher_error_by_level")
    @classmethod
    def _check_error_by_level(cls, value: dict[int, float] | None) -> dict[int, float] | None:
        if value is not None:
            bad = {level: rate for level, rate in value.items() if level < 0 or not 0.0 <= rate <= 1.0}
            if bad or not value:
                raise ValueError(f"warmup_teacher_error_by_level needs levels >= 0 and rates in [0, 1], got {value}")
        return value

    @model_validator(mode="after")
    def _check_eval(self) -> "LMOptions":
        if self.eval_target == "sampled" and self.eval_samples == 0:
            raise ValueError("eval_target: sampled needs eval_samples >= 1")
        return self

    @model_validator(mode="after")
    def _check_task(self) -> "LMOptions":
        try:
            cls = get_task_class(self.task)
        except KeyError as error:
            raise ValueError(f"task: {error.args[0]}") from None
        cls.Options.model_validate(self.task_options)
        if self.warmup_task_options is not None:
            cls.Options.model_validate(self.warmup_task_options)
        return self


class LMEnvironment(Environment):
    name = "lm"
    Options = LMOptions
    options: LMOptions

    def __init__(self, options: LMOptions | None = None, seed: int = 0, run_dir: Path | None = None):
        super().__init__(options, seed, run_dir)
        opts = self.options
        self.device = _resolve_device(opts.device)
        self.autocast_dtype = _resolve_autocast(opts.dtype, self.device)
        self.task: Task = get_task(opts.task, opts.task_options)
        self._temp_dir = None if run_dir is not None else Path(tempfile.mkdtemp(prefix="mpts-lm-"))
        self.work_dir = Path(run_dir) if run_dir is not None else self._temp_dir

        self.train_problems, self.eval_problems = split_problems(self.task, opts.num_prompts, opts.eval_prompts, seed)
        # the warm-up's problems are graded and slipped by their own options (e.g. their answer order)
        self.warmup_task = self.task if opts.warmup_task_options is None else get_task(opts.task, opts.warmup_task_options)
        warmup_problems = (warmup_set(self.warmup_task, opts.warmup_sft_problems, seed, self.eval_problems)
                           if opts.warmup_sft_steps > 0 else [])

        self.model, self.tokenizer, model_dir = self._build_policy(warmup_problems)
        self.pad_id = self.tokenizer.pad_token_id
        texts = [self.task.format_prompt(p) for p in self.train_problems]
        self.prompt_ids = [self._encode(t) for t in texts]
        self.eval_prompt_ids = [self._encode(self.task.format_prompt(p)) for p in self.eval_problems]
        # features = MiniLM embeddings of the prompts, computed only if a predictor asks (gp, id_vae)
        self._pool = text_pool(texts, clusters=torch.tensor([p.difficulty for p in self.train_problems], dtype=torch.long))
        if run_dir is not None:  # for the report's selection-by-level figure (the trace holds prompt ids only)
            Path(run_dir).mkdir(parents=True, exist_ok=True)  # a given model without warm-up writes nothing before
            write_json(Path(run_dir) / LEVELS_FILE, {"levels": [p.difficulty for p in self.train_problems]})

        # the trainer scores completions at the rollout temperature (the distribution they were drawn from)
        self.trainer = GRPOTrainer(self.model, opts.grpo.model_copy(update={"autocast_dtype": self.autocast_dtype}),
                                   pad_id=self.pad_id, seed=seed, temperature=opts.temperature)
        self.backend = self._build_backend(model_dir)
        self.sampling = SamplingConfig(opts.max_new_tokens, opts.temperature, opts.top_p)
        self.greedy_sampling = SamplingConfig(opts.max_new_tokens, 0.0)
        self.rollout_calls = 0
        self.eval_calls = 0
        self.policy_version = 0  # bumped by every optimiser step
        self.synced_version = 0  # the backend starts from the weights the trainer starts from
        self._groups: dict[int, tuple[list[list[int]], Tensor]] = {}  # prompt id -> (completions, rewards)

    @classmethod
    def feature_dim(cls, options: EnvironmentOptions) -> int:
        return EMBEDDING_DIM  # the prompts' sentence embeddings (text_pool), computed when a predictor asks

    # -- construction -------------------------------------------------------------------------
    def _build_policy(self, warmup_problems: list[Problem]):
        opts = self.options
        policy_dir = self.work_dir / POLICY_DIR
        fingerprint = self._fingerprint()
        if _read_fingerprint(policy_dir) == fingerprint:  # a resumed run: the warmed-up start is on disk
            model, tokenizer = _load_local(policy_dir)
            return model.to(self.device).eval(), tokenizer, policy_dir
        cached = self._cache_entry(fingerprint)
        if cached is not None and _read_fingerprint(cached) == fingerprint:  # the same start, warmed up by an earlier run
            _set_aside(policy_dir)
            shutil.copytree(cached, policy_dir)
            model, tokenizer = _load_local(policy_dir)
            logger.info("warm-up: reusing the starting policy in %s", cached)
            return model.to(self.device).eval(), tokenizer, policy_dir
        if opts.model is None:
            tokenizer = build_char_tokenizer()
            model = build_tiny_model(tokenizer, opts.tiny, self.seed)
        else:
            model, tokenizer = _load_local(Path(opts.model))
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.to(self.device)
        if opts.warmup_sft_steps > 0:
            if not warmup_problems:
                raise ValueError("warmup_sft_problems: no problems left for the warm-up")
            targets = [reference_completion(self.warmup_task, p) for p in warmup_problems]
            rates = _slip_rates(warmup_problems, opts.warmup_teacher_error, opts.warmup_teacher_error_by_level)
            flawed = ([reference_completion(self.warmup_task, p, self.warmup_task.flawed_answer(p)) for p in warmup_problems]
                      if max(rates) > 0 else None)
            prompts = [self.warmup_task.format_prompt(p) for p in warmup_problems]
            start = time.perf_counter()
            losses = supervised_warmup(model, tokenizer, prompts, targets, opts.warmup_sft_steps,
                                       opts.warmup_sft_batch, opts.warmup_sft_lr, self.seed, self.device,
                                       flawed_targets=flawed, flaw_rate=rates)
            logger.info("supervised warm-up: %d steps in %.1f s, loss %.3f -> %.3f", opts.warmup_sft_steps,
                        time.perf_counter() - start, losses[0], losses[-1])
        model.eval()
        if opts.model is not None and opts.warmup_sft_steps == 0:
            return model, tokenizer, Path(opts.model)  # the engine loads the user's checkpoint as it is
        _set_aside(policy_dir)
        save_model(model, tokenizer, policy_dir)
        (policy_dir / _FINGERPRINT_FILE).write_text(json.dumps({"fingerprint": fingerprint}))
        self._publish_policy(policy_dir, fingerprint)
        return model, tokenizer, policy_dir

    def _cache_entry(self, fingerprint: str) -> Path | None:
        """Where the warm-up cache keeps this start; None without a cache or a warm-up."""
        if self.options.warmup_cache is None or self.options.warmup_sft_steps == 0:
            return None
        # lexically: the run folder may not exist yet; an absolute path stays as it is
        cache = Path(os.path.normpath(self.work_dir / Path(self.options.warmup_cache).expanduser()))
        return cache / fingerprint[:32]

    def _publish_policy(self, policy_dir: Path, fingerprint: str) -> None:
        """Copy a freshly warmed-up policy into the cache, whole or not at all (a rename), so a
        concurrent run never reads half a policy; if another run published first, its copy stays."""
        entry = self._cache_entry(fingerprint)
        if entry is None:
            return
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=entry.parent))
        shutil.copytree(policy_dir, staging, dirs_exist_ok=True)
        try:
            os.rename(staging, entry)
        except OSError:  # already there (published by a concurrent run): ours is the same policy
            shutil.rmtree(staging, ignore_errors=True)

    def _fingerprint(self) -> str:
        """What determines the starting policy: a saved one is reused only when all of it matches."""
        o = self.options
        keys = {"seed": self.seed, "task": o.task, "task_options": o.task_options, "model": o.model,
                "tiny": o.tiny.model_dump(), "warmup": [o.warmup_sft_steps, o.warmup_sft_batch, o.warmup_sft_lr,
                                                        o.warmup_sft_problems, o.num_prompts, o.eval_prompts]}
        if o.warmup_teacher_error > 0:  # a new key only when set, so existing runs keep their fingerprint
            keys["warmup_teacher_error"] = o.warmup_teacher_error
        if o.warmup_task_options is not None:
            keys["warmup_task_options"] = o.warmup_task_options
        if o.warmup_teacher_error_by_level is not None:
            keys["warmup_teacher_error_by_level"] = {str(k): v for k, v in sorted(o.warmup_teacher_error_by_level.items())}
        return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()

    def _build_backend(self, model_dir: Path) -> RolloutBackend:
        opts = self.options
        backend = opts.backend
        if backend == "auto":
            from .rollout.vllm_backend import vllm_available

            backend = "vllm" if vllm_available() else "hf"
            if backend == "hf":
                logger.warning("backend auto: vLLM is not importable here; rollouts fall back to HF generate")
        self.backend_name = backend
        if backend == "hf":
            return make_backend("hf", model=self.model, tokenizer=self.tokenizer, share=True,
                                batch_prompts=opts.generation_batch, autocast_dtype=self.autocast_dtype)
        dtype = "bfloat16" if self.autocast_dtype == torch.bfloat16 else "float32"
        return make_backend("vllm", model_dir=model_dir, tokenizer=self.tokenizer, dtype=dtype,
                            gpu_memory_utilization=opts.gpu_memory_utilization, max_model_len=opts.max_model_len,
                            seed=self.seed)

    def _encode(self, text: str) -> list[int]:
        if self.options.chat_template:
            ids = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                     tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        else:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"prompt {text!r} tokenizes to nothing")
        return list(ids)

    # -- the Environment seam -----------------------------------------------------------------
    @property
    def pool(self) -> PromptPool:
        return self._pool

    def rollout(self, ids: Tensor, k: int) -> Outcomes:
        ids = self._check_ids(ids)
        if k < 1:
            raise ValueError(f"k (rollouts per prompt) must be >= 1, got {k}")
        info = {"sync_seconds": self._sync()}
        index = ids.tolist()
        seed = _derive_seed(self.seed, 1, self.rollout_calls)
        self.rollout_calls += 1

        start = time.perf_counter()
        completions, failed = self._generate_isolated([self.prompt_ids[i] for i in index], k, self.sampling, seed)
        info["generate_seconds"] = time.perf_counter() - start

        start = time.perf_counter()
        rewards, grading_failed = self._grade(completions.texts, [self.train_problems[i] for i in index], failed)
        info["reward_seconds"] = time.perf_counter() - start
        failed |= grading_failed

        successes = (rewards >= 1.0).sum(dim=1).float()
        greedy_solved = None
        if self.options.greedy_probe:  # before the update: was this prompt already solved greedily?
            start = time.perf_counter()
            greedy_solved = self._solve_rate([self.prompt_ids[i] for i in index],
                                             [self.train_problems[i] for i in index], 1, self.greedy_sampling,
                                             seed) >= 1.0
            info["greedy_probe_seconds"] = time.perf_counter() - start
        for row, prompt_id in enumerate(index):
            if not failed[row]:
                self._groups[prompt_id] = (completions.token_ids[row], rewards[row])
            else:
                self._groups.pop(prompt_id, None)
        lengths = [len(c) for row, group in enumerate(completions.token_ids) if not failed[row] for c in group]
        info["mean_completion_tokens"] = sum(lengths) / max(len(lengths), 1)
        return Outcomes(ids=ids, successes=successes.masked_fill(failed, 0.0),
                        trials=torch.full((len(index),), float(k)), failed=failed, info=info,
                        greedy_solved=greedy_solved)

    def train_on(self, outcomes: Outcomes) -> dict[str, float]:
        ids = outcomes.ids[~outcomes.failed].tolist()
        missing = [i for i in ids if i not in self._groups]
        if missing:
            raise ValueError(f"train_on: prompt ids {missing[:5]} have no completions from the current policy; "
                             f"roll them out first")
        if not ids:
            return {"loss": 0.0, "kl": float("nan"), "grad_norm": 0.0}
        groups = [self._groups[i] for i in ids]
        sizes = {len(g[0]) for g in groups}
        if len(sizes) != 1:
            raise ValueError(f"train_on: groups of different sizes {sorted(sizes)}; GRPO groups need one k")
        advantages = group_advantages(torch.stack([g[1] for g in groups]), self.options.grpo.scale_by_std,
                                      self.trainer.config.adv_eps)
        k = sizes.pop()
        keep = [(row, j) for row, g in enumerate(groups) for j in range(k) if len(g[0][j]) > 0]
        batch = Sequences(prompt_ids=[self.prompt_ids[ids[row]] for row, _ in keep],
                          completion_ids=[groups[row][0][j] for row, j in keep],
                          advantages=torch.stack([advantages[row, j] for row, j in keep]) if keep else torch.zeros(0))
        self._groups.clear()  # after this update the completions are off-policy
        if len(batch) == 0 or (self.trainer.reference is None and not bool((batch.advantages != 0).any())):
            return {"loss": 0.0, "kl": float("nan"), "grad_norm": 0.0, "informative_groups": 0.0}
        stats = self.trainer.step(batch)
        self.policy_version += 1
        stats["informative_groups"] = float((advantages != 0).any(dim=1).sum())
        return stats

    def evaluate(self) -> float:
        return self.evaluate_metrics()["eval_accuracy"]

    def evaluate_metrics(self) -> dict[str, float]:
        """Held-out greedy accuracy and sampled accuracy at the rollout temperature (mean over
        `eval_samples` samples per problem), each with its standard error over problems (`_se`:
        the spread of per-problem solve rates / sqrt(problems), the resolution of a target crossing);
        `eval_accuracy` is the one `eval_target` names. With `eval_by_level`, also per level."""
        self._sync()
        seed = _derive_seed(self.seed, 2, self.eval_calls)
        self.eval_calls += 1
        rates = {"greedy": self._solve_rate(self.eval_prompt_ids, self.eval_problems, 1, self.greedy_sampling, seed)}
        if self.options.eval_samples > 0:
            rates["sampled"] = self._solve_rate(self.eval_prompt_ids, self.eval_problems, self.options.eval_samples,
                                                self.sampling, seed)
        levels = torch.tensor([p.difficulty for p in self.eval_problems])
        out: dict[str, float] = {}
        for kind, rate in rates.items():
            out[f"eval_accuracy_{kind}"] = float(rate.mean())
            out[f"eval_accuracy_{kind}_se"] = standard_error(rate)
            if self.options.eval_by_level:
                for level in torch.unique(levels).tolist():
                    out[f"eval_accuracy_{kind}_level{level}"] = float(rate[levels == level].mean())
        out["eval_accuracy"] = out[f"eval_accuracy_{self.options.eval_target}"]
        return out

    def accuracy_on(self, ids: Tensor) -> Tensor:
        """Greedy correctness (0/1) of the current policy on pool prompts, as the eval measures it."""
        ids = check_prompt_ids(ids, self._pool.size, purpose="evaluate")
        self._sync()
        index = ids.tolist()
        return self._solve_rate([self.prompt_ids[i] for i in index], [self.train_problems[i] for i in index], 1,
                                self.greedy_sampling, 0)

    def _solve_rate(self, prompts: list[list[int]], problems: list[Problem], n: int, sampling: SamplingConfig,
                    seed: int) -> Tensor:
        """[prompts] share of n samples graded correct; a failed problem counts as unsolved."""
        if not prompts:
            return torch.zeros(0)
        completions, failed = self._generate_isolated(prompts, n, sampling, seed)
        rewards, _ = self._grade(completions.texts, problems, failed)
        return rewards.mean(dim=1)

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": {name: t.detach().cpu().clone() for name, t in self.model.state_dict().items()},
            "trainer": self.trainer.state_dict(),
            "rollout_calls": self.rollout_calls, "eval_calls": self.eval_calls,
            "policy_version": self.policy_version,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.trainer.load_state_dict(state["trainer"])
        self.rollout_calls = int(state["rollout_calls"])
        self.eval_calls = int(state["eval_calls"])
        self.policy_version = int(state["policy_version"])
        self.synced_version = -1  # the engine still holds the starting weights
        self._groups.clear()

    def close(self) -> None:
        backend, self.backend = getattr(self, "backend", None), None
        if backend is not None:
            backend.close()
        self.task.close()
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)

    # -- helpers --------------------------------------------------------------------------------
    def _sync(self) -> float:
        if self.synced_version == self.policy_version:
            return 0.0
        start = time.perf_counter()
        self.backend.sync_weights(self.model)
        self.synced_version = self.policy_version
        return time.perf_counter() - start

    def _generate_isolated(self, prompts: list[list[int]], n: int, sampling: SamplingConfig, seed: int):
        """One batched call; if it crashes, prompt by prompt, so one bad prompt fails alone."""
        from .rollout import Completions

        try:
            return self.backend.generate(prompts, n, sampling, seed), torch.zeros(len(prompts), dtype=torch.bool)
        except Exception as error:
            logger.warning("batched generation failed (%s: %s); retrying prompt by prompt",
                           type(error).__name__, error)
        token_ids, texts, failed = [], [], []
        for offset, prompt in enumerate(prompts):
            try:
                one = self.backend.generate([prompt], n, sampling, _derive_seed(seed, 3, offset))
                token_ids.append(one.token_ids[0])
                texts.append(one.texts[0])
                failed.append(False)
            except Exception as error:
                logger.warning("generation failed for one prompt (%s: %s)", type(error).__name__, error)
                token_ids.append([[] for _ in range(n)])
                texts.append(["" for _ in range(n)])
                failed.append(True)
        return Completions(token_ids, texts), torch.tensor(failed, dtype=torch.bool)

    def _grade(self, texts: list[list[str]], problems: list[Problem], failed: Tensor) -> tuple[Tensor, Tensor]:
        """[prompts, n] rewards and a per-prompt flag for grading errors (a verifier crash, a time-out)."""
        n = len(texts[0])
        flat_texts = [t for group in texts for t in group]
        flat_problems = [p for p in problems for _ in range(n)]
        try:
            scores = self.task.score(flat_texts, flat_problems)
            rewards = torch.tensor([s.reward for s in scores], dtype=torch.float32).view(len(problems), n)
            errors = torch.tensor([s.error is not None for s in scores]).view(len(problems), n)
        except Exception as error:
            logger.warning("grading failed for the whole batch (%s: %s)", type(error).__name__, error)
            return torch.zeros(len(problems), n), torch.ones(len(problems), dtype=torch.bool)
        return rewards.masked_fill(failed.unsqueeze(1), 0.0), errors.any(dim=1) & ~failed

    def _check_ids(self, ids: Tensor) -> Tensor:
        ids = check_prompt_ids(ids, self._pool.size, purpose="roll out")
        if torch.unique(ids).numel() != ids.numel():
            raise ValueError("prompt ids repeat within one rollout call")
        return ids.long()


def split_problems(task: Task, num_prompts: int, eval_prompts: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """The pool's problems (prompt id = position) and the held-out eval problems of a run at `seed`."""
    problems = task.problems(num_prompts + eval_prompts, seed)
    # A seeded shuffle before the split: a generator may emit its problems in an order that
    # depends on difficulty (arithmetic's one-digit problems run out first), and pool and eval
    # set should share one mixture.
    random.Random(seed).shuffle(problems)
    train = problems[:num_prompts]
    train_questions = {p.question for p in train}
    # Held out: disjoint by construction, and any question that also occurs in training is dropped.
    held_out = [p for p in problems[num_prompts:] if p.question not in train_questions]
    if not held_out:
        raise ValueError("eval_prompts: every evaluation problem also occurs in the training pool")
    return train, held_out


def warmup_set(task: Task, n: int, seed: int, eval_problems: list[Problem]) -> list[Problem]:
    """The supervised warm-up's problems: their own stream (the set does not move with the pool size),
    minus every held-out eval question. Pool questions may recur: a small family such as arithmetic's
    155 one-digit problems is used up by pool and eval, and a warm-up without them leaves that part
    of the eval unreachable."""
    held_out = {p.question for p in eval_problems}
    return [p for p in task.problems(n, seed + 1) if p.question not in held_out]


def standard_error(rates: Tensor) -> float:
    """Standard error of the mean of per-problem solve rates (0 for fewer than two problems)."""
    return float(rates.std(unbiased=True) / rates.numel() ** 0.5) if rates.numel() > 1 else 0.0


def reference_completion(task: Task, problem: Problem, answer: str | None = None) -> str:
    """The supervised target for `answer` (default: the reference answer): the first of a few answer
    formats that the task's own verifier accepts for the reference answer."""
    answer = problem.answer if answer is None else answer
    for plain, candidate in ((problem.answer, answer), (f"<answer>{problem.answer}</answer>", f"<answer>{answer}</answer>")):
        if task.reward(plain, problem) >= 1.0:
            return candidate
    raise ValueError(f"warmup_sft_steps: task {task.name!r} accepts neither {problem.answer!r} nor its "
                     f"<answer> tag as an answer to {problem.question!r}; no supervised target")


def _set_aside(policy_dir: Path) -> None:
    """Another start is in the way (other warm-up settings, or a save cut short): set aside, never deleted."""
    if policy_dir.exists():
        os.replace(policy_dir, policy_dir.with_name(f"{POLICY_DIR}.replaced-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"))


def _load_local(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path.is_dir():
        raise FileNotFoundError(f"model: {path} is not a local directory (nothing is downloaded)")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    return model, tokenizer


def _slip_rates(problems: list[Problem], rate: float, by_level: dict[int, float] | None) -> list[float]:
    """The warm-up teacher's slip rate for each problem: its level's rate, else the one rate."""
    by_level = by_level or {}
    return [by_level.get(p.difficulty, rate) for p in problems]


def _read_fingerprint(policy_dir: Path) -> str | None:
    try:
        return json.loads((policy_dir / _FINGERPRINT_FILE).read_text())["fingerprint"]
    except (OSError, ValueError, KeyError):
        return None


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was asked for but no CUDA device is available")
    return torch.device(name)


def _resolve_autocast(name: str, device: torch.device) -> torch.dtype | None:
    """None: plain float32. bf16 is autocast over fp32 master weights."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return torch.bfloat16 if name == "bfloat16" else None


def _derive_seed(seed: int, stream: int, counter: int) -> int:
    """Independent seeds per (run seed, stream, call number)."""
    digest = hashlib.blake2b(f"{seed}:{stream}:{counter}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2
