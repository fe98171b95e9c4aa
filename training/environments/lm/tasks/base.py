"""The task seam: where problems come from, what the policy sees, and how an answer is graded.

A `Task` is a problem generator (or loader) plus a verifier. Rewards are binary (1.0 or 0.0).
Grading never raises for a completion, whatever the model wrote: a malformed answer is simply
wrong (reward 0, no error), while a crash or a time-out of the verifier itself gives reward 0
*and* an error message, so the environment can mark that rollout as failed instead of dying.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
from typing import Any, ClassVar, Sequence

from mpts.models.options import StrictOptions

logger = logging.getLogger(__name__)


class TaskOptions(StrictOptions):
    """Base of every task's options (see `StrictOptions`)."""


@dataclasses.dataclass(frozen=True)
class Problem:
    question: str  # the problem statement
    answer: str  # reference answer (string form)
    difficulty: int  # graded level, 0 = easiest
    meta: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)  # task-specific


@dataclasses.dataclass(frozen=True)
class Score:
    """One graded completion: the reward, and why grading failed (None when it did not)."""

    reward: float
    error: str | None = None


class Task(abc.ABC):
    """A problem source with a verifier. Construct with an `Options` instance or a plain dict."""

    name: ClassVar[str]
    Options: ClassVar[type[TaskOptions]] = TaskOptions

    def __init__(self, options: TaskOptions | dict | None = None):
        if options is None:
            options = self.Options()
        elif isinstance(options, dict):
            options = self.Options.model_validate(options)
        elif not isinstance(options, self.Options):
            raise TypeError(f"{type(self).__name__} options must be a dict or {self.Options.__name__}, "
                            f"got {type(options).__name__}")
        self.options = options
        # Errors of the latest `rewards` call, aligned with its completions (None = graded fine).
        self.last_errors: list[str | None] = []

    @abc.abstractmethod
    def problems(self, n: int, seed: int) -> list[Problem]:
        """n distinct problems, the same list for the same (n, seed)."""

    @abc.abstractmethod
    def format_prompt(self, problem: Problem) -> str:
        """The text the policy is conditioned on."""

    @abc.abstractmethod
    def _grade(self, completion: str, problem: Problem) -> bool:
        """True when the completion answers the problem. May raise; the public methods catch."""

    def score(self, completions: Sequence[str], problems: Sequence[Problem]) -> list[Score]:
        """Grade each completion against its problem; one failure never spoils the others."""
        check_batch(completions, problems)
        return [self._score_one(c, p) for c, p in zip(completions, problems)]

    def rewards(self, completions: Sequence[str], problems: Sequence[Problem]) -> list[float]:
        """Binary rewards; grading errors give 0.0 and are kept in `self.last_errors`."""
        scores = self.score(completions, problems)
        self.last_errors = [s.error for s in scores]
        failures = sum(e is not None for e in self.last_errors)
        if failures:
            first = next(e for e in self.last_errors if e is not None)
            logger.warning("%s: grading failed on %d of %d completions (first: %s)",
                           self.name, failures, len(scores), first)
        return [s.reward for s in scores]

    def reward(self, completion: str, problem: Problem) -> float:
        """The reward of one completion: 1.0 or 0.0, never an exception."""
        return self._score_one(completion, problem).reward

    def flawed_answer(self, problem: Problem) -> str:
        """The answer a teacher with this task's typical systematic slip would give (for a warm-up
        whose targets are partly wrong in a consistent way). Tasks without such a slip refuse."""
        raise ValueError(f"task {self.name!r} defines no flawed answer; warmup_teacher_error needs one")

    def close(self) -> None:
        """Release worker processes or files (nothing for pure-Python verifiers)."""

    def _score_one(self, completion: str, problem: Problem) -> Score:
        if not isinstance(completion, str):
            return Score(0.0, f"completion must be a str, got {type(completion).__name__}")
        try:
            return Score(1.0 if self._grade(completion, problem) else 0.0)
        except Exception as error:  # a verifier bug must not take the run down
            return Score(0.0, f"{type(error).__name__}: {error}"[:500])


def check_batch(completions: Sequence[str], problems: Sequence[Problem]) -> None:
    if len(completions) != len(problems):
        raise ValueError(f"completions and problems must have the same length "
                         f"(got {len(completions)} completions, {len(problems)} problems)")


def check_count(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")


def fill_template(template: str, **values: str) -> str:
    """`{name}` placeholders replaced literally, so LaTeX braces in templates need no escaping."""
    for key, value in values.items():
        template = template.replace("{" + key + "}", value)
    return template


def check_template(template: str, required: Sequence[str], field: str) -> str:
    missing = [name for name in required if "{" + name + "}" not in template]
    if missing:
        raise ValueError(f"{field} must contain the placeholder(s) {', '.join('{' + m + '}' for m in missing)}")
    return template
