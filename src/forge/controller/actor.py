"""`ForgeActor` and `@endpoint`: what a service author writes.

    class Counter(ForgeActor):
        def __init__(self, start: int = 0):
            self.value = start

        @endpoint
        async def incr(self, by: int = 1) -> int:
            self.value += by
            return self.value

    counter = await Counter.options(num_replicas=2).as_service(start=5)
    await counter.incr.route(3)

The class knows nothing of processes: the provisioner (local or monarch) places its replicas.
While an actor runs, `self.rank`, `self.world_size` (hosts x procs of its replica), `self.replica_id`
and `self.device` are set before `__init__`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, TypeVar

import torch

if TYPE_CHECKING:
    from forge.controller.service import ActorHandle, ServiceHandle

F = TypeVar("F", bound=Callable[..., Any])


def endpoint(fn: F | None = None, *, changes_state: bool = False) -> Any:
    """Mark a method as callable through a service/actor handle: `@endpoint`, or
    `@endpoint(changes_state=True)` for one that changes state a restart would lose: under
    `restart="restore"` the service keeps the actor's `state_dict()` after each such call."""

    def mark(f: F) -> F:
        f._forge_endpoint = True  # type: ignore[attr-defined]
        f._forge_changes_state = changes_state  # type: ignore[attr-defined]
        return f

    return mark(fn) if fn is not None else mark


def _foreign_endpoint(member: Any) -> Callable[..., Any] | None:
    """The method under monarch's `@monarch.actor.endpoint` (what torchforge code imports): an
    `EndpointProperty` descriptor holding it as `_method`. Recognised by shape, so monarch stays
    an optional dependency."""
    method = getattr(member, "_method", None)
    if type(member).__name__ == "EndpointProperty" and callable(method):
        return method
    return None


def endpoint_names(cls: type) -> list[str]:
    return [
        name
        for name, member in inspect.getmembers(cls)
        if callable(member) and getattr(member, "_forge_endpoint", False)
    ]


def state_changing_endpoints(cls: type) -> set[str]:
    return {name for name, member in inspect.getmembers(cls)
            if callable(member) and getattr(member, "_forge_changes_state", False)}


# What the Service does when a replica's process dies (forge.controller.service's docstring says how).
RESTART_POLICIES = ("stateless", "restore", "fail")


@dataclass(frozen=True)
class ActorOptions:
    procs: int = 1
    num_replicas: int = 1
    with_gpus: bool = False
    mesh_name: str | None = None  # with a multi-host job: the job's host group (mesh) to run on; None: any
    hosts: int | None = None  # hosts per replica (torchforge's hosts_per_replica); None: 1. World size = hosts x procs
    timeout_s: float = 1800.0  # per call; a generous bound so nothing ever hangs forever
    max_retries: int = 2  # retries on a *dead* replica; user exceptions are never retried
    restart_attempts: int = 3  # start-up tries of a replica being restarted (its actor's own errors: one)
    # what happens when a replica's process dies (RESTART_POLICIES); None: the actor class's `restart_policy`
    restart: str | None = None

    def validate(self, who: str) -> None:
        if self.procs < 1:
            raise ValueError(f"{who}: procs must be >= 1, got {self.procs}")
        if self.num_replicas < 1:
            raise ValueError(f"{who}: num_replicas must be >= 1, got {self.num_replicas}")
        if self.hosts is not None and self.hosts < 1:
            raise ValueError(f"{who}: hosts (per replica) must be >= 1, got {self.hosts}")
        if self.restart_attempts < 1:
            raise ValueError(f"{who}: restart_attempts must be >= 1, got {self.restart_attempts}")
        if self.timeout_s <= 0:
            raise ValueError(f"{who}: timeout_s must be > 0, got {self.timeout_s}")
        if self.restart is not None and self.restart not in RESTART_POLICIES:
            raise ValueError(f"{who}: restart must be one of {list(RESTART_POLICIES)}, got {self.restart!r}")


class ForgeActor:
    _forge_options: ActorOptions = ActorOptions()
    # The class's own answer to "what is lost when my process dies" (ActorOptions.restart overrides):
    # "stateless" (everything comes back from the constructor), "restore" (state_dict/load_state_dict
    # endpoints carry the rest), "fail" (state no restart can rebuild: the service stops serving).
    restart_policy: str = "stateless"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # `@monarch.actor.endpoint` methods become forge endpoints: the plain method, marked
        for name, member in list(cls.__dict__.items()):
            method = _foreign_endpoint(member)
            if method is not None:
                setattr(cls, name, endpoint(method))

    # runtime context, set by the provisioner before __init__ runs
    rank: int = 0
    world_size: int = 1
    replica_id: int = 0
    device: torch.device = torch.device("cpu")

    @classmethod
    def options(cls, **kwargs: Any) -> type[ForgeActor]:
        """A new subclass carrying these placement options (two services never share them)."""
        valid = {f.name for f in fields(ActorOptions)}
        if "hosts_per_replica" in kwargs:  # torchforge's ServiceConfig name
            if kwargs.get("hosts") is not None and kwargs["hosts"] != kwargs["hosts_per_replica"]:
                raise TypeError(f"{cls.__name__}.options(): hosts={kwargs['hosts']} and hosts_per_replica="
                                f"{kwargs['hosts_per_replica']} disagree (the same option); give one")
            kwargs = dict(kwargs)
            kwargs["hosts"] = kwargs.pop("hosts_per_replica")
        unknown = set(kwargs) - valid
        if unknown:
            raise TypeError(
                f"{cls.__name__}.options(): unknown option(s) {sorted(unknown)}; valid: {sorted(valid)}"
            )
        opts = replace(cls._forge_options, **{k: v for k, v in kwargs.items() if v is not None})
        opts.validate(cls.__name__)
        return type(cls.__name__, (cls,), {"_forge_options": opts, "__module__": cls.__module__,
                                            "__qualname__": cls.__qualname__, "_forge_base": _base_of(cls)})

    @classmethod
    async def as_service(cls, **init_kwargs: Any) -> ServiceHandle:
        from forge.controller.provisioner import get_provisioner
        from forge.controller.service import Service, ServiceHandle

        service = Service(cls, init_kwargs, cls._forge_options, get_provisioner())
        await service.start()
        return ServiceHandle(service)

    @classmethod
    async def as_actor(cls, **init_kwargs: Any) -> ActorHandle:
        from forge.controller.provisioner import get_provisioner
        from forge.controller.service import ActorHandle, Service

        opts = replace(cls._forge_options, num_replicas=1)
        service = Service(cls, init_kwargs, opts, get_provisioner())
        await service.start()
        return ActorHandle(service)

    @classmethod
    async def shutdown(cls, handle: Any) -> None:
        await handle.shutdown()

    async def setup(self) -> None:
        """Called once after `__init__` on every proc (and again after a restart)."""

    async def teardown(self) -> None:
        """Called on shutdown."""


def _base_of(cls: type) -> type:
    """The user's class under any number of `.options()` subclasses (what remote procs import)."""
    return cls.__dict__.get("_forge_base") or cls


def construct_actor(
    cls: type[ForgeActor], init_kwargs: dict[str, Any], *, rank: int, world_size: int,
    replica_id: int, device: torch.device,
) -> ForgeActor:
    """Instantiate with the runtime context already in place when `__init__` runs."""
    inst = cls.__new__(cls)
    inst.rank, inst.world_size, inst.replica_id, inst.device = rank, world_size, replica_id, device
    inst.__init__(**init_kwargs)
    return inst


async def maybe_await(x: Any) -> Any:
    if inspect.isawaitable(x):
        return await x
    return x
