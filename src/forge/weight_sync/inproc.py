"""Colocated weight sync: trainer and generator in one process (local backend, one device).

Tensors never leave the device. Three modes, by how strictly versions are kept apart:

- ``staged`` (default): `publish(v)` copies the trainer's parameters into a staging copy on the
  device (allocated once); the generator's `fetch()` copies staging -> its parameters between
  requests. The generator only ever holds one version; costs one extra copy of the weights.
- ``direct``: `publish(v)` copies straight into the generator's parameters. No extra memory,
  but the caller must make sure the generator is idle (e.g. it pauses generation around it).
- ``share``: the generator's parameters alias the trainer's storage (no copy at all). Only when
  the trainer is not FSDP-sharded and dtype/device match. The generator then sees every
  optimizer step immediately — version boundaries are gone and a completion can mix weights
  of two steps — so it is opt-in only, for strictly on-policy synchronous loops.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from torch import nn

from forge.weight_sync.common import WeightSyncError, copy_into, iter_full_params, target_params, unwrap

MODES = ("staged", "direct", "share")


@dataclass
class _Slot:
    lock: threading.Lock = field(default_factory=threading.Lock)
    subscriber: nn.Module | None = None
    staging: dict[str, torch.Tensor] = field(default_factory=dict)
    version: int | None = None  # newest published
    mode: str = "staged"


_REGISTRY: dict[str, _Slot] = {}
_REG_LOCK = threading.Lock()


def _slot(name: str) -> _Slot:
    with _REG_LOCK:
        return _REGISTRY.setdefault(name, _Slot())


def clear_registry(name: str | None = None) -> None:
    with _REG_LOCK:
        if name is None:
            _REGISTRY.clear()
        else:
            _REGISTRY.pop(name, None)


def register_model(name: str, model: nn.Module) -> None:
    """Make `model` (the generator's) the receiver of weights published under `name`."""
    slot = _slot(name)
    with slot.lock:
        slot.subscriber = unwrap(model)


class InprocPublisher:
    def __init__(self, model: nn.Module, name: str = "policy", mode: str = "staged"):
        if mode not in MODES:
            raise ValueError(f"inproc weight sync mode must be one of {MODES}, got {mode!r}")
        self.model, self.name, self.mode = model, name, mode
        self._shared = False

    @torch.no_grad()
    def publish(self, version: int) -> int:
        slot = _slot(self.name)
        with slot.lock:
            slot.mode = self.mode
            if self.mode == "staged":
                seen = set()
                for n, t in iter_full_params(self.model):
                    buf = slot.staging.get(n)
                    if buf is None or buf.shape != t.shape or buf.dtype != t.dtype or buf.device != t.device:
                        slot.staging[n] = buf = torch.empty_like(t)
                    buf.copy_(t)
                    seen.add(n)
                    del t  # FSDP: free the gathered parameter before the next
                for stale in set(slot.staging) - seen:  # another model published under this name before
                    del slot.staging[stale]
            else:
                if slot.subscriber is None:
                    raise WeightSyncError(f"weight sync '{self.name}' ({self.mode}): no generator model is "
                                          "registered (register_model / WeightSubscriber first)")
                if self.mode == "share":
                    self._share(slot.subscriber)
                else:
                    dst = None
                    for n, t in iter_full_params(self.model):
                        if dst is None:
                            names = {k for k, _ in unwrap(self.model).named_parameters()}
                            dst = target_params(slot.subscriber, names, f"weight sync '{self.name}'")
                        copy_into(dst[n], t, n)
                        del t
            slot.version = version
        return version

    def close(self) -> None:
        """Drop the staged copy (the trainer's teardown): per-run names never pile up in memory."""
        clear_registry(self.name)

    def _share(self, gen: nn.Module) -> None:
        if self._shared:
            return
        src = dict(unwrap(self.model).named_parameters())
        if any(hasattr(p, "full_tensor") for p in src.values()):
            raise WeightSyncError("inproc mode 'share' cannot alias FSDP-sharded parameters; use 'staged'")
        dst = target_params(gen, set(src), f"weight sync '{self.name}'")
        for n, p in dst.items():
            if p.dtype != src[n].dtype or p.device != src[n].device:
                raise WeightSyncError(f"inproc mode 'share': '{n}' is {src[n].dtype}/{src[n].device} in the trainer "
                                      f"but {p.dtype}/{p.device} in the generator; use 'staged'")
            p.data = src[n].data  # alias storage: the generator sees trainer updates at once
        self._shared = True


def published_version(name: str) -> int | None:
    with _REG_LOCK:
        slot = _REGISTRY.get(name)
    return None if slot is None else slot.version


def staged_weights(name: str, version: int) -> dict[str, torch.Tensor]:
    """The staged tensors of `version` (for `Generator.update_weights(version)` to copy from)."""
    slot = _slot(name)
    with slot.lock:
        if slot.version != version:
            raise WeightSyncError(f"weight sync '{name}': version {version} requested but the staged version is "
                                  f"{slot.version} (a newer push replaced it, or none happened)")
        if slot.mode != "staged":
            raise WeightSyncError(f"weight sync '{name}' uses mode '{slot.mode}': weights are already in place")
        return dict(slot.staging)


class InprocSubscriber:
    def __init__(self, model: nn.Module, name: str = "policy"):
        self.model, self.name = model, name
        register_model(name, model)

    def available_version(self) -> int | None:
        return _slot(self.name).version

    @torch.no_grad()
    def fetch(self, version: int | None = None) -> int:
        slot = _slot(self.name)
        with slot.lock:
            if slot.version is None:
                raise WeightSyncError(f"weight sync '{self.name}': nothing has been published yet")
            if version is not None and slot.version < version:
                raise WeightSyncError(f"weight sync '{self.name}': version {version} requested but the newest "
                                      f"published is {slot.version}")
            if slot.mode == "staged":
                dst = target_params(self.model, set(slot.staging), f"weight sync '{self.name}'")
                for n, src in slot.staging.items():
                    copy_into(dst[n], src, n)
            return slot.version
