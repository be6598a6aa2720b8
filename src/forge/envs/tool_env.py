"""`ToolEnvironment`: a task the model solves by calling tools over several turns.

Each model turn either calls tools (`<tool_call>...</tool_call>`, executed, results come back as
`tool` messages) or answers: a turn without a tool call ends the episode and is scored by the
task (`task.verify(response, target)`) or by `reward_fn(prompt, response, target)`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from forge.config import registry
from forge.envs.base import Environment, Observation, register_env
from forge.envs.tools import Tool, ToolRegistry, has_tool_call


def resolve_tool(spec: Tool | Callable[..., Any] | str, sandbox: Any = None) -> Tool:
    """A `Tool` from a Tool, a typed function, or a tool factory's registered name (kind "tool":
    `calculator`, `python`) or import path; a factory is called with the env's sandbox config."""
    if isinstance(spec, Tool):
        return spec
    if isinstance(spec, str):
        tool = registry.lookup("tool", spec)(sandbox)
        if not isinstance(tool, Tool):
            raise TypeError(f"tool factory {spec!r} returned {type(tool).__name__}, not a forge.envs.Tool")
        return tool
    if callable(spec):
        return Tool.from_function(spec)
    raise TypeError(f"a tool must be a Tool, a function or a built-in tool name, got {type(spec).__name__}")


def sample_prompt(sample: Any) -> tuple[str, list[dict[str, Any]] | None]:
    """(prompt text, chat messages or None) of a dataset row (torchforge's `request` key too)."""
    if isinstance(sample, str):
        return sample, None
    if not isinstance(sample, dict):
        raise TypeError(f"environment sample must be a dict (prompt/target) or a str, got {type(sample).__name__}")
    msgs = sample.get("messages")
    for key in ("prompt", "request", "question"):
        if isinstance(sample.get(key), str):
            return sample[key], msgs
    if msgs:
        return next((m["content"] for m in reversed(msgs) if m.get("role") == "user"), ""), msgs
    raise KeyError(f"environment sample has none of prompt/request/question/messages: keys {sorted(sample)}")


@register_env("tool")
class ToolEnvironment(Environment):
    def __init__(self, tools: Iterable[Tool | Callable[..., Any] | str] = (), task: Any = None,
                 max_turns: int = 4, system_prompt: str | None = None,
                 reward_fn: Callable[[str, str, Any], float] | None = None, include_tool_schemas: bool = True,
                 sandbox: Any = None):
        if max_turns < 1:
            raise ValueError(f"ToolEnvironment: max_turns must be >= 1, got {max_turns}")
        self.registry = ToolRegistry(resolve_tool(t, sandbox) for t in tools)
        task = _resolve_task(task)
        if task is not None and not hasattr(task, "verify") and reward_fn is None:
            task, reward_fn = None, task  # a bare reward(prompt, response, target) callable
        self.task = task
        self.max_turns = max_turns
        self.system_prompt = system_prompt if system_prompt is not None else getattr(self.task, "system_prompt", None)
        self.reward_fn = reward_fn
        self.include_tool_schemas = include_tool_schemas
        if self.task is None and reward_fn is None:
            raise ValueError("ToolEnvironment needs a `task` (with verify(response, target)) or a `reward_fn`")
        self._prompt, self._target, self._turn = "", None, 0

    def tool_schemas(self) -> list[dict[str, Any]] | None:
        return self.registry.schemas() if self.include_tool_schemas and len(self.registry) else None

    async def reset(self, sample: Any) -> Observation:
        self._prompt, msgs = sample_prompt(sample)
        self._target = sample.get("target") if isinstance(sample, dict) else None
        self._turn = 0
        if msgs is None:
            msgs = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + \
                   [{"role": "user", "content": self._prompt}]
        return Observation(text=self._prompt, metadata={"messages": msgs, "tools": self.tool_schemas()})

    async def step(self, action: str) -> Observation:
        self._turn += 1
        if has_tool_call(action):
            results, stats = await self.registry.run_calls(action)
            meta = {"messages": [{"role": "tool", "content": r.text} for r in results], "role": "tool",
                    "tool_calls": stats.as_dict()}
            if self._turn >= self.max_turns:  # no turn left to use the result in
                return Observation(text="\n".join(r.text for r in results), reward=0.0, done=True,
                                   metadata={**meta, "stop_reason": "max_turns"})
            return Observation(text="\n".join(r.text for r in results), metadata=meta)
        return Observation(text="", reward=float(self.score(action)), done=True,
                           metadata={"stop_reason": "answer", "tool_calls": {}})

    def score(self, response: str) -> float:
        if self.reward_fn is not None:
            return self.reward_fn(self._prompt, response, self._target)
        return self.task.verify(response, self._target)


def _resolve_task(task: Any) -> Any:
    """A task object as it is; a registered task name (kind "task") or `{_target_: ..., **kwargs}` built."""
    if isinstance(task, (str, Mapping)):
        return registry.instantiate("task", task)
    if task is None or hasattr(task, "verify") or callable(task):
        return task
    raise TypeError(f"ToolEnvironment: bad task {task!r}")


__all__ = ["ToolEnvironment", "resolve_tool", "sample_prompt"]
