"""`build_loss(spec)`: a loss module from config, through the registry (`forge.config.registry`).

    build_loss("grpo")                                  # a registered name (case/underscore-insensitive)
    build_loss("GSPOLoss")                              # each loss is registered under its class name too
    build_loss({"_target_": "GSPOLoss", "clip_low": 3e-4})
    build_loss({"name": "dapo", "clip_high": 0.3})      # torchforge's spelling of the target
    build_loss("my_pkg.losses.MyLoss")                  # any importable nn.Module class
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from forge.config import registry


def build_loss(spec: str | Mapping[str, Any] | type | nn.Module, **overrides: Any) -> nn.Module:
    """Build a loss module from ``spec`` (see module docstring); ``overrides`` update kwargs."""
    if isinstance(spec, nn.Module):
        if overrides:
            raise ValueError("cannot apply keyword overrides to an already-built loss module")
        return spec
    kwargs: dict[str, Any] = {}
    if isinstance(spec, Mapping):
        cls, kwargs = registry.split_spec("loss", spec)
    else:
        cls = registry.lookup("loss", spec) if isinstance(spec, str) else spec
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"loss {spec!r} is not an nn.Module class (got {cls!r})")
    return registry.call("loss", cls, {**kwargs, **overrides})


__all__ = ["build_loss"]
