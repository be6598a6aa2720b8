"""Built-in verifiable tasks, generated in code: `get_task("arithmetic", difficulty=2)`.

Tasks register themselves in `forge.config.registry` (kind "task") at import; the environment
tasks of `forge.envs.tasks` (calculator, coding) join the same kind when `forge.envs` is imported.

Each task has `sample(split, index)`, `as_dataset(split, n)`, `verify(response, target)`,
`sft_completion(sample)`; train/test are disjoint and deterministic by seed.
"""

from __future__ import annotations

import functools
from typing import Any

from forge.config import registry
from forge.data.tasks.arithmetic import ArithmeticTask
from forge.data.tasks.base import Task, response_answer
from forge.data.tasks.countdown import CountdownTask, parse_countdown_target, safe_eval

registry.register("task", "addition")(functools.partial(ArithmeticTask, ops="+"))


def get_task(name: str, **kwargs: Any) -> Task:
    """A registered task by name, or any `Task` subclass by import path ("pkg.mod:Cls")."""
    return registry.instantiate("task", name, **kwargs)


__all__ = ["ArithmeticTask", "CountdownTask", "Task", "get_task", "parse_countdown_target",
           "response_answer", "safe_eval"]
