"""Combining rewards: `CombinedReward` (weights + per-reward breakdown), `TaskReward`,
user rewards by import path, and `build_rewards(spec)` from config.

    build_rewards([{"_target_": "MathReward", "weight": 1.0},
                   {"name": "thinking", "weight": 0.2, "partial_reward": 0.1},
                   {"_target_": "mypkg.rewards:brevity", "weight": 0.5}])
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# built-in rewards register themselves (`forge.config.registry`, kind "reward") when
# `forge.data.rewards` is imported (its __init__ imports every reward module); tasks when
# `forge.data.tasks` is
from forge.config import registry
from forge.data.tasks import get_task

RewardFn = Callable[[str, str, Any], float]


@registry.register("reward", "task", "TaskReward")
@dataclass
class TaskReward:
    """A built-in task's exact `verify` as a reward (`task`: a `Task` or its registry name)."""

    task: Any = "arithmetic"
    task_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.task, str):
            self.task = get_task(self.task, **self.task_kwargs)
        self.name = f"task_{getattr(self.task, 'name', type(self.task).__name__)}"

    def __call__(self, prompt: str, response: str, target: Any) -> float:
        return float(self.task.verify(response, target))


def call_reward(fn: RewardFn, prompt: str, response: str, target: Any) -> float:
    """One reward call as a module-level function (what a process pool pickles by reference;
    importing this module in a worker does not pull in torch)."""
    return float(fn(prompt, response, target))


def reward_name(fn: Any) -> str:
    """The name a reward is logged under: its `name`, else its function or class name."""
    for cand in (getattr(fn, "name", None), getattr(fn, "__name__", None)):
        if isinstance(cand, str) and cand:
            return cand
    if isinstance(fn, functools.partial):
        return reward_name(fn.func)
    return type(fn).__name__


def load_reward(target: str | Callable[..., Any], **kwargs: Any) -> RewardFn:
    """A reward from a registered name (`forge.config.registry`, kind "reward"), an import path
    ("pkg.mod:fn" / "pkg.mod.fn") or a callable.

    A class is instantiated with `kwargs`; a function with `kwargs` gets them bound (partial).
    """
    obj = registry.lookup("reward", target) if isinstance(target, str) else target
    if inspect.isclass(obj):
        return registry.call("reward", obj, kwargs)
    if not callable(obj):
        raise TypeError(f"reward {target!r} is not callable (got {type(obj).__name__})")
    if kwargs:
        part = functools.partial(obj, **kwargs)
        part.name = reward_name(obj)  # type: ignore[attr-defined]
        return part
    return obj


class CombinedReward:
    """Several rewards with weights: total = sum(w_i * r_i) (divided by sum(w_i) if `normalize`).

    `score()` returns the total and each reward's raw value under its (unique) name.
    """

    def __init__(self, rewards: Sequence[RewardFn], weights: Sequence[float] | None = None,
                 names: Sequence[str] | None = None, normalize: bool = False):
        if not rewards:
            raise ValueError("CombinedReward needs at least one reward")
        self.rewards = list(rewards)
        self.weights = [1.0] * len(self.rewards) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(self.rewards):
            raise ValueError(f"CombinedReward: {len(self.rewards)} rewards but {len(self.weights)} weights")
        if normalize and sum(self.weights) == 0:
            raise ValueError("CombinedReward: normalize=True needs weights that do not sum to 0")
        self.normalize = normalize
        self.names = _unique(list(names) if names is not None else [reward_name(r) for r in self.rewards])
        self.name = "total"

    def total(self, values: Mapping[str, float]) -> float:
        s = sum(w * values[n] for n, w in zip(self.names, self.weights))
        return s / sum(self.weights) if self.normalize else s

    def score(self, prompt: str, response: str, target: Any) -> tuple[float, dict[str, float]]:
        values = {n: float(r(prompt, response, target)) for n, r in zip(self.names, self.rewards)}
        return self.total(values), values

    def __call__(self, prompt: str, response: str, target: Any) -> float:
        return self.score(prompt, response, target)[0]


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        k = seen.get(n, 0)
        seen[n] = k + 1
        out.append(n if k == 0 else f"{n}_{k}")
    return out


_TYPE_KEYS = ("_target_", "name", "type", "fn", "reward")


def build_rewards(spec: Any, *, normalize: bool = False) -> CombinedReward:
    """Rewards from config: a list of entries, or a mapping `{reward: kwargs}`.

    An entry is a name/import path, a callable, or a dict with one of `_target_`/`name`/`type`/
    `fn` (what to build), optional `weight` (default 1.0), optional `log_name`, and kwargs.
    """
    if isinstance(spec, CombinedReward):
        return spec
    if isinstance(spec, Mapping) and not any(k in spec for k in _TYPE_KEYS):
        spec = [{"_target_": k, **(dict(v) if v else {})} for k, v in spec.items()]
    elif isinstance(spec, (str, Mapping)) or callable(spec):
        spec = [spec]
    rewards, weights, names = [], [], []
    for i, entry in enumerate(spec):
        if isinstance(entry, Mapping):
            kw = dict(entry)
            key = next((k for k in _TYPE_KEYS if k in kw), None)
            if key is None:
                raise ValueError(f"rewards[{i}] = {dict(entry)}: say which reward with `_target_:` "
                                 f"(a registered name {registry.names('reward')} or an import path)")
            target = kw.pop(key)
            weight = float(kw.pop("weight", 1.0))
            log_name = kw.pop("log_name", None)
            fn = load_reward(target, **kw)
        else:
            fn, weight, log_name = load_reward(entry), 1.0, None
        rewards.append(fn)
        weights.append(weight)
        names.append(log_name or reward_name(fn))
    return CombinedReward(rewards, weights, names, normalize=normalize)
