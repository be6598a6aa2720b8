"""The `local` backend: every replica lives in this process, on this asyncio loop.

Zero start-up cost; the embedded default and single-device colocated runs use it. A replica
with `procs > 1` holds `procs` instances (ranks) in-process; they cannot form a
torch.distributed group (use the monarch backend for that).
"""

from __future__ import annotations

import asyncio
from typing import Any

import torch

from forge.controller.actor import construct_actor, maybe_await
from forge.controller.errors import ActorError, ReplicaDeadError
from forge.controller.replica import Replica


class LocalReplica(Replica):
    def __init__(self, *args: Any, device: torch.device, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.device = device
        self.instances: list[Any] = []
        self._tasks: set[asyncio.Task] = set()
        self._dead = False
        # one flag per incarnation: a call cancelled by kill() must still read "killed" when the
        # restart (scheduled by kill itself) has already started the next incarnation
        self._life = {"dead": False}

    async def start(self) -> None:
        procs = self.options.procs
        self._dead = False
        self._life = {"dead": False}
        self.instances = []
        for rank in range(procs):
            try:
                inst = construct_actor(self.actor_cls, self.init_kwargs, rank=rank, world_size=procs,
                                       replica_id=self.replica_id, device=self.device)
                await maybe_await(inst.setup())
            except Exception as e:
                raise ActorError(f"{self.name} rank {rank}: construction/setup failed: "
                                 f"{type(e).__name__}: {e}", e) from e
            self.instances.append(inst)
        self.healthy = True

    async def _run(self, inst: Any, rank: int, endpoint: str, args: tuple, kwargs: dict,
                   life: dict[str, bool]) -> Any:
        try:
            return await maybe_await(getattr(inst, endpoint)(*args, **kwargs))
        except asyncio.CancelledError:
            if life["dead"]:
                raise ReplicaDeadError(f"{self.name} died during {endpoint}") from None
            raise
        except Exception as e:
            raise ActorError(
                f"{self.actor_cls.__name__}.{endpoint} raised on replica {self.replica_id} rank {rank}: "
                f"{type(e).__name__}: {e}", e) from e

    async def call(self, endpoint: str, args: tuple, kwargs: dict, rank: int | None) -> list[Any]:
        if self._dead or not self.instances:
            raise ReplicaDeadError(f"{self.name} is dead")
        ranks = range(len(self.instances)) if rank is None else [rank]
        tasks = [asyncio.ensure_future(self._run(self.instances[r], r, endpoint, args, kwargs, self._life))
                 for r in ranks]
        self._tasks.update(tasks)
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            self._tasks.difference_update(tasks)

    async def stop(self) -> None:
        for inst in self.instances:
            try:
                await maybe_await(inst.teardown())
            except Exception:
                pass
        self.instances = []
        self.healthy = False

    async def kill(self) -> None:
        # What a crash looks like from outside: state gone, in-flight calls fail.
        self._dead = True
        self._life["dead"] = True
        self.healthy = False
        for t in list(self._tasks):
            t.cancel()
        self.instances = []
        self.notify_dead()
