"""Tasks with verifiers: problem generators/loaders and binary rewards.

    task = get_task("countdown", {"max_difficulty": 2})
    problems = task.problems(100, seed=0)
    prompts = [task.format_prompt(p) for p in problems]
    rewards = task.rewards(completions, problems)   # errors of that call: task.last_errors

Built-ins are imported lazily; `register_task` adds a user's class by its `name`.
"""

from __future__ import annotations

import importlib

from .base import Problem, Score, Task, TaskOptions

_BUILTIN = {
    "countdown": "mpts.training.tasks.countdown:Countdown",
    "arithmetic": "mpts.training.tasks.arithmetic:Arithmetic",
    "math_file": "mpts.training.tasks.math_file:MathFile",
}
_REGISTERED: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make `cls` selectable by `cls.name` in configs."""
    if not getattr(cls, "name", None):
        raise ValueError(f"{cls.__name__} needs a class attribute `name` to be registered")
    _REGISTERED[cls.name] = cls
    return cls


def task_names() -> list[str]:
    return sorted(set(_BUILTIN) | set(_REGISTERED))


def get_task_class(name: str) -> type[Task]:
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in _BUILTIN:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(task_names())}")
    module_name, class_name = _BUILTIN[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def get_task(name: str, options: dict | TaskOptions | None = None) -> Task:
    """An instance of the named task; `options` is validated by the task's pydantic Options."""
    return get_task_class(name)(options)


__all__ = ["Problem", "Score", "Task", "TaskOptions", "get_task", "get_task_class", "register_task", "task_names"]
