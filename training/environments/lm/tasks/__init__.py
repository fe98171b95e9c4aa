"""Tasks with verifiers: problem generators/loaders and binary rewards.

    task = get_task("countdown", {"max_difficulty": 2})
    problems = task.problems(100, seed=0)
    prompts = [task.format_prompt(p) for p in problems]
    rewards = task.rewards(completions, problems)   # errors of that call: task.last_errors

Built-ins are imported lazily; `register_task` adds a user's class by its `name`.
"""

from __future__ import annotations

from mpts.models.registry import Registry

from .base import Problem, Score, Task, TaskOptions

TASKS: Registry = Registry("task", {
    "countdown": "mpts.training.environments.lm.tasks.countdown:Countdown",
    "arithmetic": "mpts.training.environments.lm.tasks.arithmetic:Arithmetic",
    "math_file": "mpts.training.environments.lm.tasks.math_file:MathFile",
})
register_task = TASKS.register
task_names = TASKS.names
get_task_class = TASKS.get


def get_task(name: str, options: dict | TaskOptions | None = None) -> Task:
    """An instance of the named task; `options` is validated by the task's pydantic Options."""
    return get_task_class(name)(options)


__all__ = ["TASKS", "Problem", "Score", "Task", "TaskOptions", "get_task", "get_task_class", "register_task", "task_names"]
