"""What a backend provides: a `Replica` — `procs` copies of one actor class that answer together.

The `Service` (routing, sessions, retries, timeouts) is backend-agnostic and only talks to
this interface; `forge.controller.local` and `forge.controller.monarch` implement it.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

from forge.controller.actor import ActorOptions


class Replica(abc.ABC):
    def __init__(self, actor_cls: type, init_kwargs: dict[str, Any], options: ActorOptions, replica_id: int):
        self.actor_cls = actor_cls
        self.init_kwargs = init_kwargs
        self.options = options
        self.replica_id = replica_id
        self.healthy = False
        self.inflight = 0
        self.restarts = 0
        # Bumped by the Service on every restart, so that a late failure report from an old
        # incarnation never triggers a second restart of the new one.
        self.generation = 0
        # Set by the Service: called when the backend notices on its own (a watchdog, a kill)
        # that this replica died, so an idle dead replica is restarted too.
        self.on_death: Callable[[Replica], None] | None = None
        # Why this replica is gone for good (its restart policy is 'fail', or restoring its state
        # failed); the Service never routes to a lost replica again. None while it serves.
        self.lost: str | None = None

    @property
    def name(self) -> str:
        return f"{self.actor_cls.__name__}[replica {self.replica_id}]"

    @abc.abstractmethod
    async def start(self) -> None:
        """Create the procs, construct the actor on each, run `setup()`; then `healthy=True`."""

    @abc.abstractmethod
    async def call(self, endpoint: str, args: tuple, kwargs: dict, rank: int | None) -> list[Any]:
        """Run `endpoint` on one rank (`rank=int`) or all (`None`); results in rank order.

        Raises `ActorError` if the endpoint raised, `ReplicaDeadError` if the process died.
        """

    @abc.abstractmethod
    async def stop(self) -> None:
        """Tear down the procs (best effort, never raises)."""

    @abc.abstractmethod
    async def kill(self) -> None:
        """Kill the replica abruptly (what a crash looks like); used by failure tests."""

    async def probe(self, timeout: float) -> None:  # noqa: B027 (optional: backends that can tell override it)
        """Return if the replica's processes answer within `timeout`; raise (`CallTimeoutError`,
        `ReplicaDeadError`) if not. The Service asks after a call timed out, to tell a slow
        endpoint (the replica answers) from a hung or stopped process (it does not: replaced).
        In-process replicas share the caller's loop, so they always answer."""

    def notify_dead(self) -> None:
        """Mark unhealthy and tell the owning Service (which restarts it)."""
        self.healthy = False
        if self.on_death is not None:
            self.on_death(self)

    async def drain_metrics(self) -> list[Any]:
        """Metric records recorded inside this replica's procs since the last drain."""
        return []
