"""Multi-digit arithmetic, small enough for a tiny character-level model to learn on CPU.

Prompt and question are the bare equation, e.g. `23+58=`; the reference answer is `81`.
A correct completion is the number, then the end of the text (the end-of-sequence token),
a newline or the literal end marker `</s>`:

    "81"   " 81 "   "81\\n23+5=28"   "81</s>junk"   -> 1.0
    "081"  "8 1"   "+81"   "81 junk"   "82"   ""     -> 0.0

Grading is lenient on whitespace around the number and strict on the number itself (canonical
decimal, ASCII digits, "-" for negatives). A completion that holds `<answer>…</answer>` is graded
on the last such tag instead, for models that were taught the tag format.

Options: operand sizes (`min_digits`..`max_digits`, or `digit_counts`, a list to draw d from, for a
pool mixed over lengths), `operators` (any of ``+ - *``), and whether subtraction may go negative. The
first operand has exactly d digits, d drawn uniformly from the range (or the list), and the second
1..d digits (order swapped at random for ``+`` and ``*``).
The flawed answer (`flawed_answer`, the teacher slip a warm-up can imitate) is the right number
with a leading zero, "081": a formatting slip the grader rejects on every problem, which one
decision shared by all prompts (end the number or write the zero) fixes. (A slip in the arithmetic
itself, dropped carries, was tried first: taught on 60% of examples it kept the 2-layer model of
`lm_tiny` from learning the task in its warm-up at all.)
Difficulty (the pool's cluster) with `level: steps` (default) = (d - 1) + the number of carries
(for +), borrows (for -) or digit products of 10 or more (for ``*``), so "3+4=" is level 0 and "58+67="
(two digits, two carries) is level 3; with `level: digits` it is d - 1 (one level per length).
"""

from __future__ import annotations

import random
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from .base import Problem, Task, TaskOptions, check_count
from .extract import last_answer_tag

END_MARKER = "</s>"

Operator = Literal["+", "-", "*"]


class ArithmeticOptions(TaskOptions):
    min_digits: int = Field(1, ge=1, le=18)
    max_digits: int = Field(3, ge=1, le=18)
    operators: tuple[Operator, ...] = ("+", "-")
    allow_negative: bool = False
    digit_counts: tuple[int, ...] | None = Field(None, description="digit counts d of the first operand, one drawn "
                                                 "uniformly per problem (repeat a count to weight it); replaces "
                                                 "min_digits..max_digits, e.g. [2, 3, 4, 5] for a pool mixed "
                                                 "over lengths")
    level: Literal["steps", "digits"] = Field("steps", description="the difficulty recorded as the prompt's "
                                              "cluster: steps = (d - 1) + carries/borrows; digits = d - 1")
    reverse_answer: bool = Field(False, description="answers written least-significant digit first (125 as "
                                 "'521'): each digit then depends only on its column and the carry just "
                                 "written, which small transformers learn far faster")

    @field_validator("operators")
    @classmethod
    def _operators(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("operators must name at least one of + - *")
        return tuple(dict.fromkeys(value))

    @field_validator("digit_counts")
    @classmethod
    def _digit_counts(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if value is not None and (not value or any(not 1 <= d <= 18 for d in value)):
            raise ValueError(f"digit_counts must list digit counts between 1 and 18, got {list(value)}")
        return value

    @model_validator(mode="after")
    def _digits(self) -> "ArithmeticOptions":
        if self.digit_counts is not None:
            return self
        if self.min_digits > self.max_digits:
            raise ValueError(f"min_digits={self.min_digits} must be <= max_digits={self.max_digits}")
        return self


class Arithmetic(Task):
    name: ClassVar[str] = "arithmetic"
    Options: ClassVar[type[TaskOptions]] = ArithmeticOptions
    options: ArithmeticOptions

    def problems(self, n: int, seed: int) -> list[Problem]:
        check_count(n)
        rng = random.Random(seed)
        seen: set[tuple[int, str, int]] = set()
        out: list[Problem] = []
        draws_left = 20 * n + 1000
        while len(out) < n:
            if draws_left <= 0:
                counts = (self.options.digit_counts or
                          f"{self.options.min_digits}..{self.options.max_digits}")
                raise ValueError(
                    f"arithmetic: could not draw {n} distinct problems with digits {counts} and operators "
                    f"{''.join(self.options.operators)} (found {len(out)}); ask for fewer or allow more digits")
            draws_left -= 1
            a, op, b, digits = self._draw(rng)
            if (a, op, b) in seen:
                continue
            seen.add((a, op, b))
            result = a + b if op == "+" else a - b if op == "-" else a * b
            steps = _carries(a, op, b)
            level = digits - 1 + (steps if self.options.level == "steps" else 0)
            out.append(Problem(question=f"{a}{op}{b}=", answer=self._written(result), difficulty=level,
                               meta={"a": a, "b": b, "op": op, "digits": digits, "carries": steps}))
        return out

    def format_prompt(self, problem: Problem) -> str:
        return problem.question

    def _grade(self, completion: str, problem: Problem) -> bool:
        text = completion.split(END_MARKER, 1)[0]
        tagged = last_answer_tag(text)
        candidate = tagged if tagged is not None else text.lstrip().split("\n", 1)[0]
        return candidate.strip() == problem.answer

    def flawed_answer(self, problem: Problem) -> str:
        digits = problem.answer.lstrip("-")
        value = int(digits[::-1] if self.options.reverse_answer else digits)
        return self._written(-value if problem.answer.startswith("-") else value, leading_zero=True)

    def _written(self, value: int, leading_zero: bool = False) -> str:
        digits = ("0" if leading_zero else "") + str(abs(value))
        return ("-" if value < 0 else "") + (digits[::-1] if self.options.reverse_answer else digits)

    def _draw(self, rng: random.Random) -> tuple[int, str, int, int]:
        counts = self.options.digit_counts
        digits = rng.choice(counts) if counts else rng.randint(self.options.min_digits, self.options.max_digits)
        op = rng.choice(self.options.operators)
        a = _with_digits(digits, rng)
        b = _with_digits(rng.randint(1, digits), rng)
        if op == "-" and not self.options.allow_negative:
            swap = a < b
        else:
            swap = rng.random() < 0.5
        if swap:
            a, b = b, a
        return a, op, b, digits


def _with_digits(digits: int, rng: random.Random) -> int:
    """A uniform integer with exactly `digits` decimal digits (0..9 for one digit)."""
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def _carries(a: int, op: str, b: int) -> int:
    """Carries of a+b, borrows of |a-b|, or digit products >= 10 of a*b: the schoolbook hard steps."""
    if op == "*":
        xs, ys = _digits_of(a), _digits_of(b)
        return sum(x * y >= 10 for x in xs for y in ys)
    xs, ys = _digits_of(max(a, b)), _digits_of(min(a, b))
    ys += [0] * (len(xs) - len(ys))
    count, carry = 0, 0
    for x, y in zip(xs, ys):
        carry = int(x - y - carry < 0) if op == "-" else int(x + y + carry >= 10)
        count += carry
    return count


def _digits_of(value: int) -> list[int]:
    """Decimal digits, least significant first."""
    return [int(ch) for ch in reversed(str(value))]
