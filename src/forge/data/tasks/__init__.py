"""Built-in verifiable tasks, generated in code: `get_task("arithmetic", difficulty=2)`.

Each task has `sample(split, index)`, `as_dataset(split, n)`, `verify(response, target)`,
`sft_completion(sample)`; train/test are disjoint and deterministic by seed.
"""

from __future__ import annotations

import importlib
from typing import Any

from forge.data.tasks.arithmetic import ArithmeticTask
from forge.data.tasks.base import Task, response_answer
from forge.data.tasks.countdown import CountdownTask, parse_countdown_target, safe_eval

TASKS: dict[str, tuple[type[Task], dict[str, Any]]] = {
    "arithmetic": (ArithmeticTask, {}),
    "addition": (ArithmeticTask, {"ops": "+"}),
    "countdown": (CountdownTask, {}),
}


def get_task(name: str, **kwargs: Any) -> Task:
    """A built-in task by name, or any `Task` subclass by import path ("pkg.mod:Cls")."""
    if name in TASKS:
        cls, defaults = TASKS[name]
        return cls(**{**defaults, **kwargs})
    if ":" in name or "." in name:
        mod, _, attr = name.partition(":") if ":" in name else name.rpartition(".")
        cls = getattr(importlib.import_module(mod), attr)
        return cls(**kwargs)
    raise KeyError(f"unknown task {name!r}; built-in tasks: {sorted(TASKS)} (or an import path 'pkg.mod:Cls')")


__all__ = ["TASKS", "ArithmeticTask", "CountdownTask", "Task", "get_task", "parse_countdown_target",
           "response_answer", "safe_eval"]
