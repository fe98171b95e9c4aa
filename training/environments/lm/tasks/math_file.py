"""Math problems from a local JSONL or parquet file, graded with `math-verify`.

The file needs a question column and an answer column; by default the first present of::

    question: question, problem, prompt, query, input
    answer:   answer, final_answer, expected_answer, solution, target, output

is used (or name them with `question_field` / `answer_field`). An optional difficulty column
(`level`, `difficulty`; integers or strings such as "Level 3") is shifted so the easiest is 0.
A reference answer may be a bare result ("3", "\\frac{1}{2}"), a solution containing
`\\boxed{…}`, or GSM8K style text ending in "#### 72" (the part after the last "####" is used).
Rows with the same question and answer count once.

A correct completion gives its final answer in `\\boxed{…}` or `<answer>…</answer>`; the last one
counts (a later tag of either kind overrides an earlier one). No boxed or tagged answer: 0.

Grading runs in worker processes (`math_worker.py`) with math-verify's signal-based time-outs
off, so it works from any thread; each comparison gets `timeout_seconds`, after which its
worker is killed (and restarted on the next request) and the item scores 0 with an error.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import queue
import random
import re
import select
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any, ClassVar, Sequence

from pydantic import Field, model_validator

from mpts.models.extras import import_extra

from .base import Problem, Score, Task, TaskOptions, check_batch, check_count, check_template, fill_template
from .extract import last_answer_tag, last_boxed

QUESTION_FIELDS = ("question", "problem", "prompt", "query", "input")
ANSWER_FIELDS = ("answer", "final_answer", "expected_answer", "solution", "target", "output")
DIFFICULTY_FIELDS = ("level", "difficulty")
WORKER_SCRIPT = Path(__file__).with_name("math_worker.py")

DEFAULT_TEMPLATE = "{question}\nPlease reason step by step, and put your final answer within \\boxed{}."


class MathFileOptions(TaskOptions):
    path: str
    question_field: str | None = None
    answer_field: str | None = None
    difficulty_field: str | None = None
    template: str = DEFAULT_TEMPLATE
    timeout_seconds: float = Field(5.0, gt=0)
    workers: int = Field(1, ge=1, le=64)
    startup_timeout_seconds: float = Field(120.0, gt=0)
    max_answer_chars: int = Field(1000, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "MathFileOptions":
        check_template(self.template, ("question",), "template")
        return self


class MathFile(Task):
    name: ClassVar[str] = "math_file"
    Options: ClassVar[type[TaskOptions]] = MathFileOptions
    options: MathFileOptions

    def __init__(self, options: MathFileOptions | dict | None = None):
        if options is None:
            raise ValueError("math_file needs options with `path` (a .jsonl or .parquet file)")
        super().__init__(options)
        import_extra("math_verify", "lm")  # graded in worker processes; fail here, in one line
        self._rows = load_rows(Path(self.options.path), self.options)
        self._pool = _WorkerPool(self.options.workers, self.options.startup_timeout_seconds)
        self._finalizer = weakref.finalize(self, self._pool.close)

    def problems(self, n: int, seed: int) -> list[Problem]:
        check_count(n)
        if n > len(self._rows):
            raise ValueError(f"math_file: asked for {n} problems but {self.options.path} has only "
                             f"{len(self._rows)} distinct ones")
        order = list(range(len(self._rows)))
        random.Random(seed).shuffle(order)
        return [self._rows[i] for i in order[:n]]

    def format_prompt(self, problem: Problem) -> str:
        return fill_template(self.options.template, question=problem.question)

    def score(self, completions: Sequence[str], problems: Sequence[Problem]) -> list[Score]:
        check_batch(completions, problems)
        with concurrent.futures.ThreadPoolExecutor(self.options.workers) as threads:
            return list(threads.map(self._score_one, completions, problems))

    def _grade(self, completion: str, problem: Problem) -> bool:
        answer = final_answer(completion)
        if not answer or len(answer) > self.options.max_answer_chars:
            return False
        gold = problem.meta.get("gold") or reference_answer(problem.answer)
        correct, error = self._pool.grade(gold, "\\boxed{" + answer + "}", self.options.timeout_seconds)
        if error is not None:
            raise GradingError(error)
        return correct

    def close(self) -> None:
        self._finalizer()


class GradingError(RuntimeError):
    """The grader crashed or ran out of time on one item."""


def final_answer(completion: str) -> str | None:
    """The last answer given, in `\\boxed{}` or `<answer>` tags (whichever comes later), with
    surrounding whitespace and `$` delimiters removed; a boxed answer inside a tag is unwrapped."""
    tagged, boxed = last_answer_tag(completion), last_boxed(completion)
    if tagged is not None and (boxed is None or completion.rfind("</answer>") > completion.rfind("\\boxed{")):
        inner = last_boxed(tagged)
        answer = inner if inner is not None else tagged
    else:
        answer = boxed
    if answer is None:
        return None
    answer = answer.strip()
    if len(answer) >= 2 and answer[0] == answer[-1] == "$":
        answer = answer.strip("$").strip()
    return answer


def reference_answer(value: str) -> str:
    """The gold string handed to math-verify: boxed text as is, GSM8K "#### x" cut, else boxed."""
    if "\\boxed" in value:
        return value
    if "####" in value:
        value = value.rsplit("####", 1)[1]
    return "\\boxed{" + value.strip() + "}"


def load_rows(path: Path, options: MathFileOptions) -> list[Problem]:
    records = _read_records(path)
    if not records:
        raise ValueError(f"math_file: {path} holds no rows")
    columns = list(dict.fromkeys(key for record in records[:1000] for key in record))
    question_field = _pick_field(options.question_field, QUESTION_FIELDS, columns, "question_field", path)
    answer_field = _pick_field(options.answer_field, ANSWER_FIELDS, columns, "answer_field", path)
    difficulty_field = options.difficulty_field
    if difficulty_field is None:
        difficulty_field = next((f for f in DIFFICULTY_FIELDS if f in columns), None)
    elif difficulty_field not in columns:
        raise ValueError(f"math_file: difficulty_field {difficulty_field!r} is not a column of {path} "
                         f"(columns: {', '.join(columns)})")

    levels = [_level(r.get(difficulty_field), i, difficulty_field, path) if difficulty_field else 0
              for i, r in enumerate(records)]
    lowest = min(levels)
    rows: list[Problem] = []
    seen: set[tuple[str, str]] = set()
    for i, record in enumerate(records):
        question = _text(record.get(question_field), i, question_field, path)
        answer = _text(record.get(answer_field), i, answer_field, path)
        if (question, answer) in seen:
            continue
        seen.add((question, answer))
        meta = {"row": i, "gold": reference_answer(answer)}
        rows.append(Problem(question=question, answer=answer, difficulty=levels[i] - lowest, meta=meta))
    return rows


def _read_records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"math_file: no such file {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    if suffix == ".json" and path.read_text(encoding="utf-8").lstrip().startswith("["):
        records = json.loads(path.read_text(encoding="utf-8"))
        if not all(isinstance(record, dict) for record in records):
            raise ValueError(f"math_file: {path} must be a JSON array of objects")
        return records
    if suffix in (".jsonl", ".json"):
        records = []
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"math_file: {path} line {number} is not JSON: {error}") from None
                if not isinstance(record, dict):
                    raise ValueError(f"math_file: {path} line {number} is not a JSON object")
                records.append(record)
        return records
    raise ValueError(f"math_file: {path} must end in .jsonl, .json or .parquet")


def _pick_field(chosen: str | None, candidates: tuple[str, ...], columns: list[str], option: str,
                path: Path) -> str:
    if chosen is not None:
        if chosen not in columns:
            raise ValueError(f"math_file: {option} {chosen!r} is not a column of {path} "
                             f"(columns: {', '.join(columns)})")
        return chosen
    for name in candidates:
        if name in columns:
            return name
    kind = option.removesuffix("_field")
    raise ValueError(f"math_file: {path} has no {kind} field; expected one of {', '.join(candidates)} "
                     f"or set {option} (columns: {', '.join(columns)})")


def _text(value: Any, row: int, field: str, path: Path) -> str:
    if value is None or (isinstance(value, float) and value != value):
        raise ValueError(f"math_file: {path} row {row} has no value in field {field!r}")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"math_file: {path} row {row} field {field!r} must be text or a number, "
                         f"got {type(value).__name__}")
    text = str(value)
    if not text.strip():
        raise ValueError(f"math_file: {path} row {row} field {field!r} is empty")
    return text


def _level(value: Any, row: int, field: str, path: Path) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    match = re.search(r"-?\d+", value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"math_file: {path} row {row} field {field!r} must hold an integer level, got {value!r}")
    return int(match.group())


class _Worker:
    """One `math_worker.py` process, asked one question at a time."""

    def __init__(self, startup_timeout: float):
        self.process = subprocess.Popen(
            [sys.executable, "-u", str(WORKER_SCRIPT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            bufsize=0, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        self._buffer = b""
        try:
            self._read_line(startup_timeout)
        except BaseException:
            self.kill()
            raise

    def ask(self, gold: str, pred: str, timeout: float) -> tuple[bool, str | None]:
        self.process.stdin.write((json.dumps({"gold": gold, "pred": pred, "timeout": timeout}) + "\n").encode())
        reply = json.loads(self._read_line(timeout))
        return bool(reply["correct"]), reply["error"]

    def _read_line(self, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no answer within {timeout:g} s")
            readable, _, _ = select.select([fd], [], [], remaining)
            if readable:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError(f"grading worker exited with code {self.process.wait()}")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            stream.close()


class _WorkerPool:
    """Up to `size` workers, started on first use; a worker that times out or dies is replaced."""

    def __init__(self, size: int, startup_timeout: float):
        self._idle: queue.Queue[_Worker | None] = queue.Queue()
        for _ in range(size):
            self._idle.put(None)
        self._startup_timeout = startup_timeout
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()
        self._closed = False

    def grade(self, gold: str, pred: str, timeout: float) -> tuple[bool, str | None]:
        worker = self._idle.get()
        try:
            if self._closed:
                return False, "the task was closed"
            if worker is None:
                worker = _Worker(self._startup_timeout)
                with self._lock:
                    self._all.add(worker)
            return worker.ask(gold, pred, timeout)
        except TimeoutError:
            self._discard(worker)
            worker = None
            return False, f"grading timed out after {timeout:g} s"
        except Exception as error:
            self._discard(worker)
            worker = None
            return False, f"grading worker failed: {type(error).__name__}: {error}"[:500]
        finally:
            self._idle.put(worker)

    def _discard(self, worker: _Worker | None) -> None:
        if worker is not None:
            with self._lock:
                self._all.discard(worker)
            worker.kill()

    def close(self) -> None:
        self._closed = True
        with self._lock:
            workers, self._all = list(self._all), set()
        for worker in workers:
            worker.kill()
