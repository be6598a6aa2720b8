"""`build_loss(spec)`: a loss from a name, a dict/YAML block, an import path, a class or a module.

    build_loss("grpo")                                  # case/underscore-insensitive, "Loss" optional
    build_loss("GSPOLoss")
    build_loss({"_target_": "GSPOLoss", "clip_low": 3e-4})
    build_loss({"name": "dapo", "clip_high": 0.3})
    build_loss("my_pkg.losses.MyLoss")                  # any importable nn.Module class
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Mapping
from typing import Any

from torch import nn

from forge.losses.cispo import CISPOLoss
from forge.losses.clip_cov import ClipCovLoss
from forge.losses.dapo import DAPOLoss
from forge.losses.gmpo import GMPOLoss
from forge.losses.gpg import GPGLoss
from forge.losses.grpo import GRPOLoss
from forge.losses.gspo import GSPOLoss
from forge.losses.kl_cov import KLCovLoss
from forge.losses.reinforce import ReinforceLoss
from forge.losses.sapo import SAPOLoss
from forge.losses.simple_grpo import SimpleGRPOLoss

LOSSES: dict[str, type[nn.Module]] = {
    c.__name__: c
    for c in (SimpleGRPOLoss, ReinforceLoss, GRPOLoss, DAPOLoss, GSPOLoss, CISPOLoss, SAPOLoss,
              GMPOLoss, ClipCovLoss, KLCovLoss, GPGLoss)
}


def _key(name: str) -> str:
    k = name.lower().replace("_", "").replace("-", "")
    return k[: -len("loss")] if k.endswith("loss") and len(k) > 4 else k


_BY_KEY = {_key(n): c for n, c in LOSSES.items()}


def valid_names() -> list[str]:
    return sorted(_key(n) for n in LOSSES)


def _resolve(name: str) -> type[nn.Module]:
    if not isinstance(name, str) or not name:
        raise TypeError(f"a loss name must be a non-empty string, got {name!r}")
    cls = _BY_KEY.get(_key(name))
    if cls is not None:
        return cls
    if "." in name:
        mod_name, _, attr = name.rpartition(".")
        if _key(attr) in _BY_KEY and mod_name.startswith("forge.losses"):
            return _BY_KEY[_key(attr)]
        try:
            obj = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot import loss {name!r}: {e}") from e
        if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
            raise TypeError(f"{name!r} is not an nn.Module class")
        return obj
    close = difflib.get_close_matches(_key(name), list(_BY_KEY), n=1, cutoff=0.0)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown loss {name!r}.{hint} Valid names: {', '.join(valid_names())} "
                     "(or a class name like 'GSPOLoss', or an import path 'pkg.module.Class')")


def build_loss(spec: str | Mapping[str, Any] | type | nn.Module, **overrides: Any) -> nn.Module:
    """Build a loss module from ``spec`` (see module docstring); ``overrides`` update kwargs."""
    if isinstance(spec, nn.Module):
        if overrides:
            raise ValueError("cannot apply keyword overrides to an already-built loss module")
        return spec
    kwargs: dict[str, Any] = {}
    if isinstance(spec, Mapping) or type(spec).__name__ == "DictConfig":
        if type(spec).__name__ == "DictConfig":
            from omegaconf import OmegaConf

            spec = OmegaConf.to_container(spec, resolve=True)
        kwargs = dict(spec)
        target = kwargs.pop("_target_", None)
        name = kwargs.pop("name", None)
        if target is not None and name is not None:
            raise ValueError("give the loss as either '_target_' or 'name', not both")
        target = target if target is not None else name
        if target is None:
            raise ValueError(f"a loss dict needs '_target_' or 'name'; got keys {sorted(spec)}")
        spec = target
    cls = spec if isinstance(spec, type) else _resolve(spec)
    kwargs.update(overrides)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise TypeError(f"{cls.__name__}({', '.join(kwargs)}): {e}") from e
