"""`Environment`: what a multi-turn rollout talks to, and the registry configs name them by.

    obs = await env.reset(sample)        # first observation: the task (text, or chat messages)
    while not obs.done:
        obs = await env.step(model_text) # the env's reply, reward, done

An instance holds ONE episode's state (turn counter, target, connections): run concurrent
episodes on separate instances — `env_factory(spec)()` builds a fresh one per episode.

Observation metadata keys the rollout understands (all optional):
- `messages`: chat messages to render for this observation instead of `text` (reset: the whole
  initial conversation; step: the reply turn(s), e.g. several `{"role": "tool", ...}` messages).
- `role`: the role of `text` when `messages` is absent ("user" by default; "tool" for tool output).
- `tools`: tool schemas for the chat template (reset only).
- `tool_calls`: `{"ok", "malformed", "errored", "sandbox_limit_hits"}` counts for this step.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from forge.config import registry


@dataclass
class Observation:
    """torchforge's `Observation(done, reward, metadata)` plus the text the model sees next."""

    text: str = ""
    reward: float = 0.0
    done: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)


class Environment(abc.ABC):
    """An interactive task. Subclasses implement `reset` and `step`; `close` frees resources."""

    #: registry name (set by `register_env`)
    name: str = "env"
    #: optional `forge.data.tasks.Task`-like sample source: `.sample(split, index)`
    task: Any = None

    @abc.abstractmethod
    async def reset(self, sample: Any) -> Observation:
        """Start an episode for `sample` (a dataset row); return the first observation."""

    @abc.abstractmethod
    async def step(self, action: str) -> Observation:
        """Apply the model's turn (its decoded text); return the env's reply."""

    def tool_schemas(self) -> list[dict[str, Any]] | None:
        """Tool schemas for the chat template, if this env offers tools."""
        return None

    async def close(self) -> None:
        return None

    async def __aenter__(self) -> Environment:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


# ---- registry (`forge.config.registry`, kind "env") -------------------------------------------------
def register_env(name: str) -> Callable[[Any], Any]:
    """Class (or factory) decorator: `@register_env("calculator")` makes `{_target_: calculator}` work
    (and sets the class's `name`). The built-in environments register when `forge.envs` is imported."""
    def wrap(cls: Any) -> Any:
        registry.register("env", name)(cls)
        if isinstance(cls, type):
            cls.name = name
        return cls
    return wrap


def build_env(spec: str | Mapping[str, Any] | Environment) -> Environment:
    """An environment from a config: a name, `{_target_: name_or_import_path, **kwargs}`, or an instance."""
    if isinstance(spec, Environment):
        return spec
    if not isinstance(spec, (str, Mapping)):
        raise TypeError(f"env spec must be a name or a mapping with `_target_`, got {type(spec).__name__}")
    env = registry.instantiate("env", spec)
    if not isinstance(env, Environment):
        raise TypeError(f"env {spec!r} built a {type(env).__name__}, not a forge.envs.Environment")
    return env


def env_factory(spec: str | Mapping[str, Any]) -> Callable[[], Environment]:
    """A zero-argument callable building a fresh environment per episode (validated once now)."""
    build_env(spec)  # fail early on a bad spec
    return lambda: build_env(spec)


__all__ = ["Environment", "Observation", "build_env", "env_factory", "register_env"]
