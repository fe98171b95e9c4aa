"""Countdown: combine the given numbers with + - * / to hit the target, each number used once.

Problems are built backwards from a random expression, so every one is solvable: draw the
numbers, combine them in a random order with random operators, and keep the result as the
target when it is a positive integer that is not one of the numbers. Levels whose solution uses
division start from one exact division (a multiple of a number divided by it). The reference
solution is kept in `answer` and `meta["solution"]`.

Difficulty levels (0 = easiest); a level's reference solution uses its defining operator:

    level  numbers  range    operators   solution uses
    0      3        1..10    + -         -
    1      3        1..20    + - *       *
    2      3        1..50    + - * /     /
    3      4        1..20    + - *       *
    4      4        1..50    + - * /     /
    5      4        1..100   + - * /     /

Problems are spread evenly over the chosen levels (round robin); a level whose distinct problems
run out (level 0 holds about 600) drops out of the rotation and the others fill the rest.

A correct completion puts an expression in `<answer>…</answer>`; the LAST complete tag counts
(see `extract.py`). The expression is checked by `safe_arith` (integers, + - * /, unary minus,
parentheses; no exponents; at most `max_expression_chars` characters), evaluated exactly with
fractions (intermediate fractions are allowed, division by zero scores 0), and must use the
given numbers exactly once each (as a multiset) and equal the target. Nothing may follow the
expression inside the tag ("(1+2)*3 = 9" scores 0). Grading time is bounded by the length limit.
"""

from __future__ import annotations

import dataclasses
import random
from fractions import Fraction
from typing import ClassVar

from pydantic import Field, model_validator

from . import safe_arith
from .base import Problem, Task, TaskOptions, check_count, check_template, fill_template
from .extract import last_answer_tag


@dataclasses.dataclass(frozen=True)
class Level:
    operands: int
    max_number: int
    operators: str
    needs: str | None  # the operator the reference solution must use


LEVELS = (
    Level(3, 10, "+-", None),
    Level(3, 20, "+-*", "*"),
    Level(3, 50, "+-*/", "/"),
    Level(4, 20, "+-*", "*"),
    Level(4, 50, "+-*/", "/"),
    Level(4, 100, "+-*/", "/"),
)

EXHAUSTED_AFTER = 200  # consecutive duplicates after which a level counts as used up

DEFAULT_TEMPLATE = (
    "Using the numbers {numbers}, create an equation that equals {target}. You can use basic "
    "arithmetic operations (+, -, *, /) and each number can only be used once. Show your work in "
    "<think> </think> tags. And return the final answer in <answer> </answer> tags, for example "
    "<answer> (1 + 2) / 3 </answer>."
)


class CountdownOptions(TaskOptions):
    min_difficulty: int = Field(0, ge=0, le=len(LEVELS) - 1)
    max_difficulty: int = Field(len(LEVELS) - 1, ge=0, le=len(LEVELS) - 1)
    max_target: int = Field(1000, ge=10)
    max_expression_chars: int = Field(safe_arith.MAX_CHARS, ge=10, le=2000)
    template: str = DEFAULT_TEMPLATE

    @model_validator(mode="after")
    def _check(self) -> "CountdownOptions":
        if self.min_difficulty > self.max_difficulty:
            raise ValueError(f"min_difficulty={self.min_difficulty} must be <= max_difficulty={self.max_difficulty}")
        check_template(self.template, ("numbers", "target"), "template")
        return self


class Countdown(Task):
    name: ClassVar[str] = "countdown"
    Options: ClassVar[type[TaskOptions]] = CountdownOptions
    options: CountdownOptions

    def problems(self, n: int, seed: int) -> list[Problem]:
        check_count(n)
        rng = random.Random(seed)
        active = list(range(self.options.min_difficulty, self.options.max_difficulty + 1))
        misses = dict.fromkeys(active, 0)  # consecutive duplicate draws per level
        seen: set[tuple] = set()
        out: list[Problem] = []
        turn = 0
        while len(out) < n:
            if not active:
                raise ValueError(f"countdown: could not draw {n} distinct problems for difficulty "
                                 f"{self.options.min_difficulty}..{self.options.max_difficulty} "
                                 f"(got {len(out)}); ask for fewer or widen the levels")
            level = active[turn % len(active)]
            problem = self._draw(LEVELS[level], level, rng)
            key = (level, tuple(sorted(problem.meta["numbers"])), problem.meta["target"])
            if key in seen:
                misses[level] += 1
                if misses[level] >= EXHAUSTED_AFTER:  # a small level ran dry: the others carry on
                    active.remove(level)
                continue
            misses[level] = 0
            seen.add(key)
            out.append(problem)
            turn += 1
        return out

    def format_prompt(self, problem: Problem) -> str:
        numbers = "[" + ", ".join(str(x) for x in problem.meta["numbers"]) + "]"
        return fill_template(self.options.template, numbers=numbers, target=str(problem.meta["target"]))

    def _grade(self, completion: str, problem: Problem) -> bool:
        expression = last_answer_tag(completion)
        if expression is None:
            return False
        try:
            value, used = safe_arith.evaluate(expression, max_chars=self.options.max_expression_chars)
        except safe_arith.ExpressionError:
            return False
        return sorted(used) == sorted(problem.meta["numbers"]) and value == problem.meta["target"]

    def _draw(self, level: Level, index: int, rng: random.Random) -> Problem:
        for _ in range(10_000):
            units: list[tuple[Fraction, str, set[str]]] = []
            numbers: list[int] = []
            if level.needs == "/":  # seed one exact division, else a random tree rarely lands on an integer
                divisor = rng.randint(2, level.max_number // 2)
                dividend = divisor * rng.randint(2, level.max_number // divisor)
                numbers += [dividend, divisor]
                units.append((Fraction(dividend, divisor), f"{dividend} / {divisor}", {"/"}))
            rest = [rng.randint(1, level.max_number) for _ in range(level.operands - len(numbers))]
            numbers += rest
            units += [(Fraction(x), str(x), set()) for x in rest]
            rng.shuffle(units)
            built = _random_expression(units, level.operators, rng)
            if built is None:
                continue
            value, text, ops = built
            if (value.denominator == 1 and 1 <= value <= self.options.max_target
                    and int(value) not in numbers and (level.needs is None or level.needs in ops)):
                rng.shuffle(numbers)  # the order shown says nothing about the solution
                target = int(value)
                question = f"Use {', '.join(map(str, numbers))} to make {target}"
                meta = {"numbers": numbers, "target": target, "solution": text, "operators": level.operators}
                return Problem(question=question, answer=text, difficulty=index, meta=meta)
        raise RuntimeError(f"countdown: no valid expression found for level {index}")  # not reached in practice


def _random_expression(units: list[tuple[Fraction, str, set[str]]], operators: str, rng: random.Random
                       ) -> tuple[Fraction, str, set[str]] | None:
    """A random binary tree over `units` (value, text, operators used) in this order."""
    if len(units) == 1:
        return units[0]
    split = rng.randint(1, len(units) - 1)
    left = _random_expression(units[:split], operators, rng)
    right = _random_expression(units[split:], operators, rng)
    if left is None or right is None:
        return None
    op = rng.choice(operators)
    a, b = left[0], right[0]
    if op == "/" and b == 0:
        return None
    value = a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else a / b
    text = f"{_wrap(left[1])} {op} {_wrap(right[1])}"
    return value, text, left[2] | right[2] | {op}


def _wrap(text: str) -> str:
    return text if text.isdigit() else f"({text})"
