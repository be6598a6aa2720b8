"""Provisioners place replicas: `local` (in-process) or `monarch` (real processes).

    init_provisioner("monarch")       # or set FORGE_PROVISIONER=monarch; default: local
    svc = await Policy.options(num_replicas=2).as_service(...)
    ...
    await shutdown()
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

from forge.controller.actor import ActorOptions
from forge.controller.replica import Replica

if TYPE_CHECKING:
    from forge.controller.service import Service

PROVISIONERS = ("local", "monarch")


class Provisioner:
    kind = "base"

    def __init__(self) -> None:
        self.services: list[Service] = []

    def create_replica(self, actor_cls: type, init_kwargs: dict[str, Any], options: ActorOptions, replica_id: int) -> Replica:
        raise NotImplementedError

    def register(self, service: Service) -> None:
        self.services.append(service)

    def unregister(self, service: Service) -> None:
        if service in self.services:
            self.services.remove(service)

    async def collect_metrics(self) -> list[Any]:
        """Metric records from every remote proc (the local process's are drained directly)."""
        out: list[Any] = []
        for s in list(self.services):
            out.extend(await s.drain_metrics())
        return out

    async def shutdown(self) -> None:
        import asyncio

        # all at once: stopping real processes takes a while each
        await asyncio.gather(*(s.shutdown() for s in list(self.services)), return_exceptions=True)


def visible_gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


class LocalProvisioner(Provisioner):
    kind = "local"

    def create_replica(self, actor_cls: type, init_kwargs: dict[str, Any], options: ActorOptions, replica_id: int) -> Replica:
        from forge.controller.local import LocalReplica

        if options.with_gpus and visible_gpu_count() == 0:
            device = torch.device("cpu")  # the same program runs on a laptop: fall back loudly once
            _warn_once(f"{actor_cls.__name__} asked for GPUs but none is visible; running it on CPU")
        else:
            device = torch.device("cuda", 0) if options.with_gpus else torch.device("cpu")
        return LocalReplica(actor_cls, init_kwargs, options, replica_id, device=device)


_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        import logging

        logging.getLogger("forge").warning(msg)


_provisioner: Provisioner | None = None


def init_provisioner(kind: str | None = None, **kwargs: Any) -> Provisioner:
    """Select the backend for every service created afterwards."""
    global _provisioner
    kind = kind or os.environ.get("FORGE_PROVISIONER", "local")
    if kind == "local":
        _provisioner = LocalProvisioner()
    elif kind == "monarch":
        from forge.controller.monarch import MonarchProvisioner

        _provisioner = MonarchProvisioner(**kwargs)
    else:
        raise ValueError(f"provisioner must be one of {PROVISIONERS}, got {kind!r}")
    return _provisioner


def get_provisioner() -> Provisioner:
    return _provisioner if _provisioner is not None else init_provisioner()


async def shutdown() -> None:
    """Stop every service of the current provisioner (and its processes)."""
    global _provisioner
    if _provisioner is not None:
        await _provisioner.shutdown()
        _provisioner = None
