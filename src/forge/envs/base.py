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
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


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

    async def __aenter__(self) -> "Environment":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


# ---- registry --------------------------------------------------------------------------------------
ENVS: dict[str, Callable[..., Environment]] = {}


def register_env(name: str) -> Callable[[Any], Any]:
    """Class (or factory) decorator: `@register_env("calculator")` makes `{_target_: calculator}` work."""
    def wrap(cls: Any) -> Any:
        if name in ENVS and ENVS[name] is not cls:
            raise ValueError(f"environment {name!r} is already registered ({ENVS[name]!r})")
        ENVS[name] = cls
        if isinstance(cls, type):
            cls.name = name
        return cls
    return wrap


def _resolve(target: str) -> Callable[..., Environment]:
    _load_builtins()
    if target in ENVS:
        return ENVS[target]
    if ":" in target or "." in target:
        mod, _, attr = target.partition(":") if ":" in target else target.rpartition(".")
        try:
            obj = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"env: cannot import {target!r}: {e}") from e
        if not callable(obj):
            raise TypeError(f"env: {target!r} is not a class or factory")
        return obj
    raise KeyError(f"unknown environment {target!r}; registered: {sorted(ENVS)} (or an import path 'pkg.mod:Cls')")


def _split_spec(spec: Any) -> tuple[Callable[..., Environment], dict[str, Any]]:
    if isinstance(spec, str):
        return _resolve(spec), {}
    if hasattr(spec, "items"):  # dict or OmegaConf DictConfig
        kw = {str(k): v for k, v in spec.items()}
        try:
            from omegaconf import DictConfig, ListConfig, OmegaConf

            kw = {k: OmegaConf.to_container(v, resolve=True) if isinstance(v, (DictConfig, ListConfig)) else v
                  for k, v in kw.items()}
        except ImportError:  # pragma: no cover - omegaconf is a dependency
            pass
        target = kw.pop("_target_", None) or kw.pop("name", None)
        if not isinstance(target, str):
            raise ValueError(f"env spec needs `_target_` (a registered name or import path), got {spec!r}")
        return _resolve(target), kw
    raise TypeError(f"env spec must be a name or a mapping with `_target_`, got {type(spec).__name__}")


def build_env(spec: str | dict[str, Any] | Environment) -> Environment:
    """An environment from a config: a name, `{_target_: name_or_import_path, **kwargs}`, or an instance."""
    if isinstance(spec, Environment):
        return spec
    factory, kw = _split_spec(spec)
    try:
        env = factory(**kw)
    except TypeError as e:
        raise TypeError(f"env {getattr(factory, '__name__', factory)}: bad arguments {sorted(kw)}: {e}") from e
    if not isinstance(env, Environment):
        raise TypeError(f"env factory {factory!r} returned {type(env).__name__}, not a forge.envs.Environment")
    return env


def env_factory(spec: str | dict[str, Any]) -> Callable[[], Environment]:
    """A zero-argument callable building a fresh environment per episode (validated once now)."""
    build_env(spec)  # fail early on a bad spec
    return lambda: build_env(spec)


_builtins_loaded = False


def _load_builtins() -> None:
    """Import the modules whose environments register themselves (lazily: no import cycles)."""
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        importlib.import_module("forge.envs.tool_env")
        importlib.import_module("forge.envs.tasks")
        importlib.import_module("forge.envs.openenv")


__all__ = ["ENVS", "Environment", "Observation", "build_env", "env_factory", "register_env"]
