"""One registry of named objects: losses, rewards, environments, tasks, tools, collate functions.

    @register("loss", "grpo")                      # at import of the module that defines it
    class GRPOLoss(nn.Module): ...

    resolve("loss", "grpo")                          # -> GRPOLoss (the registered object)
    resolve("loss", "my_pkg.losses:MyLoss")          # -> MyLoss (an import path; "pkg.mod.attr" too)
    resolve("loss", {"_target_": "grpo", "beta": 0}) # -> GRPOLoss(beta=0), as Hydra's `instantiate`
    instantiate("task", "arithmetic", difficulty=2)  # -> ArithmeticTask(difficulty=2): always calls

Names match case-insensitively and ignoring `_` and `-` ("clip_cov" = "ClipCov"); an import
path is anything with a `:` or a `.` (registered names have neither). A dict spec names its
target with `_target_` (or, as torchforge's configs do, `name` when `_target_` is absent); its
other keys are the keyword arguments. An unknown name is an error listing the registered names
and the closest match.

Objects register themselves when the package that defines them is imported: code that resolves a
kind imports that package at module level (`forge.losses`, `forge.data.rewards`,
`forge.data.tasks`, `forge.envs`, `forge.data.collate`). This module imports nothing of forge
above `forge.config`, so every layer may use it.
"""

from __future__ import annotations

import difflib
import functools
import importlib
from collections.abc import Callable, Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from forge.config.errors import ConfigError

# kind -> {registered name: object}, in registration order
_ENTRIES: dict[str, dict[str, Any]] = {}

# the word an error message uses for a kind
_LABELS = {"env": "environment"}


class UnknownNameError(ConfigError, KeyError):
    """A name that is not registered (a `KeyError` for lookups, a `ConfigError` for configs)."""

    __str__ = BaseException.__str__  # KeyError's would quote the whole message


class ImportPathError(ConfigError, ImportError):
    """An import path whose module or attribute does not exist."""

    __str__ = BaseException.__str__


def _key(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


def _label(kind: str) -> str:
    return _LABELS.get(kind, kind)


def _is_path(spec: str) -> bool:
    return ":" in spec or "." in spec


def register(kind: str, name: str, *aliases: str) -> Callable[[Any], Any]:
    """Decorator: `@register("reward", "math", "MathReward")` makes `obj` resolvable by each name.

    Registering a name a second time with a different object is an error (two modules would
    otherwise silently fight over it); the same object again is a no-op (a module reloaded).
    """
    names = (name, *aliases)
    for n in names:
        if not isinstance(n, str) or not n or _is_path(n):
            raise ValueError(f"registry: a {_label(kind)} name must be a non-empty string without ':' or '.', "
                             f"got {n!r}")

    def add(obj: Any) -> Any:
        entries = _ENTRIES.setdefault(kind, {})
        for n in names:
            old = _find(kind, n)
            if old is not None and entries[old] is not obj:
                raise ValueError(f"{_label(kind)} {n!r} is already registered ({entries[old]!r})")
        for n in names:
            entries.setdefault(_find(kind, n) or n, obj)
        return obj

    return add


def unregister(kind: str, name: str) -> None:
    """Forget a name (tests that register a throwaway object clean up with this)."""
    found = _find(kind, name)
    if found is not None:
        del _ENTRIES[kind][found]


def registered(kind: str) -> dict[str, Any]:
    """A copy of `{name: object}` for `kind` (aliases included), in registration order."""
    return dict(_ENTRIES.get(kind, {}))


def names(kind: str) -> list[str]:
    """The registered names of `kind`, sorted."""
    return sorted(_ENTRIES.get(kind, {}))


def _find(kind: str, name: str) -> str | None:
    k = _key(name)
    return next((n for n in _ENTRIES.get(kind, {}) if _key(n) == k), None)


def _unknown(kind: str, name: str) -> UnknownNameError:
    known = names(kind)
    by_key = {_key(n): n for n in known}
    close = difflib.get_close_matches(_key(name), list(by_key), n=1, cutoff=0.5)
    hint = f" Did you mean {by_key[close[0]]!r}?" if close else ""
    return UnknownNameError(f"unknown {_label(kind)} {name!r}.{hint} Registered: {', '.join(known) or '(none)'} "
                            "(or an import path 'pkg.module:attr')")


def _import(kind: str, path: str) -> Any:
    if ":" in path:
        mod_name, _, attr = path.partition(":")
    else:
        mod_name, _, attr = path.rpartition(".")
    if not mod_name or not attr:
        raise ImportPathError(f"{_label(kind)} {path!r}: an import path is 'pkg.module:attr' or 'pkg.module.attr'")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ImportPathError(f"cannot import {_label(kind)} {path!r}: {e}") from e
    try:
        return functools.reduce(getattr, attr.split("."), mod)
    except AttributeError:
        raise ImportPathError(f"cannot import {_label(kind)} {path!r}: module {mod_name!r} has no "
                              f"attribute {attr!r}") from None


def lookup(kind: str, name: str) -> Any:
    """The object registered as `name`, or the object at an import path."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"a {_label(kind)} name must be a non-empty string, got {name!r}")
    found = _find(kind, name)
    if found is not None:
        return _ENTRIES[kind][found]
    if _is_path(name):
        return _import(kind, name)
    raise _unknown(kind, name)


def _plain(value: Any) -> Any:
    """OmegaConf containers as plain dicts/lists (what a target's `__init__` expects)."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def split_spec(kind: str, spec: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """`{_target_: t, **kwargs}` (or `{name: t, ...}`) -> (the object t names, kwargs)."""
    kwargs = {str(k): _plain(v) for k, v in _plain(spec).items()}
    if "_target_" in kwargs:
        target = kwargs.pop("_target_")
    elif "name" in kwargs:
        target = kwargs.pop("name")
    else:
        raise ConfigError(f"a {_label(kind)} given as a mapping needs `_target_` (a registered name or an "
                          f"import path); got keys {sorted(kwargs)}")
    obj = lookup(kind, target) if isinstance(target, str) else target
    return obj, kwargs


def call(kind: str, obj: Any, kwargs: Mapping[str, Any]) -> Any:
    """`obj(**kwargs)`, a wrong keyword reported with the kind, the target and the keywords given."""
    if not callable(obj):
        raise TypeError(f"{_label(kind)} {obj!r} is not callable (a class or a factory function)")
    try:
        return obj(**kwargs)
    except TypeError as e:
        what = getattr(obj, "__qualname__", None) or repr(obj)
        raise TypeError(f"{_label(kind)} {what}: bad arguments {sorted(kwargs)}: {e}") from e


def resolve(kind: str, spec: Any) -> Any:
    """A name or import path -> the object; a `{_target_: ..., **kwargs}` mapping -> the target
    called with the kwargs (Hydra's `instantiate`); anything else is returned as it is."""
    if isinstance(spec, str):
        return lookup(kind, spec)
    if isinstance(spec, Mapping):
        obj, kwargs = split_spec(kind, spec)
        return call(kind, obj, kwargs)
    return spec


def instantiate(kind: str, spec: Any, **kwargs: Any) -> Any:
    """Always a built object: a name, import path, class or factory is called with `kwargs`; a
    mapping's own kwargs are updated with `kwargs`."""
    if isinstance(spec, Mapping):
        obj, own = split_spec(kind, spec)
        return call(kind, obj, {**own, **kwargs})
    obj = lookup(kind, spec) if isinstance(spec, str) else spec
    return call(kind, obj, kwargs)


__all__ = ["ImportPathError", "UnknownNameError", "call", "instantiate", "lookup", "names", "register",
           "registered", "resolve", "split_spec", "unregister"]
