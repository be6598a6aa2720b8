"""`Service`: replicas of one actor behind `.route()` / `.fanout()`, with sessions, bounded
retries on dead replicas, restarts and per-call timeouts. `ServiceHandle` / `ActorHandle` are
what `as_service()` / `as_actor()` return.

Failure policy (where forge differs from torchforge on purpose):
- an endpoint that raises -> `ActorError` raised in the caller, naming endpoint and replica;
  the replica keeps its state and is *not* restarted;
- a replica whose process died -> marked unhealthy, and the call retried on a healthy replica up
  to `max_retries` times; what happens to the dead one is its restart policy
  (`options(restart=...)`, default the class's `restart_policy`):
  `stateless`: restarted in the background, re-running `__init__` and `setup()` (all its state
  comes from its arguments: rewards, reference models);
  `restore`: restarted, then `load_state_dict()` with the state the service kept from
  `state_dict()` after the last `@endpoint(changes_state=True)` call (dataset position, weights
  version), before it serves again; a restore that fails loses the replica;
  `fail`: never restarted (model and optimizer state no restart can rebuild): the replica is lost
  and calls that find no other replica raise `ReplicaLostError` naming it. A service never serves
  from reset state; a restarted replica is not routable before its state is back;
- every call has a timeout (`options(timeout_s=...)`); nothing waits forever. A timed-out call
  probes its replica: one that answers is slow (`CallTimeoutError`, state kept); one that does
  not (a hung or SIGSTOPped process) is dead: handled as above, and the call retried;
- `fanout` reaches every healthy replica and skips one that dies during the call (it is being
  replaced); it fails only when none answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
import random
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from forge.controller.actor import ActorOptions, endpoint_names, state_changing_endpoints
from forge.controller.errors import (
    ActorError,
    AdverbError,
    CallTimeoutError,
    NoHealthyReplicaError,
    ReplicaDeadError,
    ReplicaLostError,
)

if TYPE_CHECKING:
    from forge.controller.provisioner import Provisioner
    from forge.controller.replica import Replica

log = logging.getLogger(__name__)

# How long a replica whose call timed out has to answer a liveness probe (capped by timeout_s).
PROBE_TIMEOUT_S = 10.0
# The pause before the n-th start-up retry of a replica being restarted (n x this; the number of
# tries is the service's `restart_attempts` option).
RESTART_BACKOFF_S = 1.0


_current_session: contextvars.ContextVar[str | None] = contextvars.ContextVar("forge_session", default=None)


class Service:
    def __init__(self, actor_cls: type, init_kwargs: dict[str, Any], options: ActorOptions, provisioner: Provisioner):
        self.actor_cls = actor_cls
        self.init_kwargs = init_kwargs
        self.options = options
        self.provisioner = provisioner
        self.replicas: list[Replica] = []
        self.sessions: dict[str, int] = {}
        self.endpoints = set(endpoint_names(actor_cls))
        self._restarting: dict[int, asyncio.Task] = {}
        self._rr = itertools.count()
        self._closed = False
        self._catching_up: set[int] = set()  # restarted, restoring its state: not routable yet
        self.restart = options.restart or getattr(actor_cls, "restart_policy", "stateless")
        if self.restart == "restore" and not {"state_dict", "load_state_dict"} <= self.endpoints:
            raise ValueError(f"{self.name}: restart='restore' needs endpoints state_dict() and "
                             "load_state_dict(state) to carry its state over a restart")
        self._state_endpoints = state_changing_endpoints(actor_cls) if self.restart == "restore" else set()
        # replica id -> (sequence, per-rank state_dict): the state a restarted replica is restored to
        self._snapshots: dict[int, tuple[int, list[Any]]] = {}
        self._snap_seq = itertools.count()

    @property
    def name(self) -> str:
        return self.actor_cls.__name__

    async def start(self) -> None:
        self.replicas = []
        try:
            # created one by one inside the try: a replica that cannot be placed (e.g. not
            # enough GPUs) releases what the earlier ones took
            for i in range(self.options.num_replicas):
                r = self.provisioner.create_replica(self.actor_cls, self.init_kwargs, self.options, i)
                r.on_death = self._on_dead
                self.replicas.append(r)
            # every start finishes (or fails) before cleanup, so none is left half-started
            results = await asyncio.gather(*(r.start() for r in self.replicas), return_exceptions=True)
            for res in results:
                if isinstance(res, BaseException):
                    raise res
        except BaseException:
            await self.shutdown()
            raise
        self.provisioner.register(self)

    # ---- replica choice -------------------------------------------------------------------
    def _healthy(self) -> list[Replica]:
        return [r for r in self.replicas if r.healthy and r.replica_id not in self._catching_up]

    def _no_replica(self, what: str) -> NoHealthyReplicaError:
        lost = [r for r in self.replicas if r.lost]
        if lost and not self._restarting and len(lost) + len(self._healthy()) == len(self.replicas):
            return ReplicaLostError(f"{self.name}: {what}; " + "; ".join(f"{r.name} is lost: {r.lost}" for r in lost))
        return NoHealthyReplicaError(f"{self.name}: {what}")

    def _pick(self, sess_id: str | None, exclude: set[int]) -> Replica:
        healthy = [r for r in self._healthy() if r.replica_id not in exclude]
        if not healthy:
            raise self._no_replica(f"no healthy replica (of {len(self.replicas)}) is available")
        if sess_id is not None:
            rid = self.sessions.get(sess_id)
            for r in healthy:
                if r.replica_id == rid:
                    return r
        # least-loaded; ties broken round-robin so idle replicas share the work
        low = min(r.inflight for r in healthy)
        ties = [r for r in healthy if r.inflight == low]
        chosen = ties[next(self._rr) % len(ties)]
        if sess_id is not None:
            self.sessions[sess_id] = chosen.replica_id  # new or moved (its replica failed)
        return chosen

    async def _wait_for_any_healthy(self) -> None:
        if self._healthy() or not self._restarting:
            return
        await asyncio.wait(list(self._restarting.values()), return_when=asyncio.FIRST_COMPLETED)

    def _on_dead(self, replica: Replica, generation: int | None = None) -> None:
        if generation is not None and generation != replica.generation:
            return  # a late report about an incarnation that was already replaced
        replica.healthy = False
        if self._closed or replica.lost:
            return
        if self.restart == "fail":
            self._lose(replica, "its process died and its restart policy is 'fail' (it holds state a restart "
                                "would reset, so it is not restarted)")
            return
        if replica.replica_id not in self._restarting:
            self._restarting[replica.replica_id] = asyncio.ensure_future(self._restart(replica))

    def _lose(self, replica: Replica, why: str) -> None:
        replica.healthy = False
        replica.lost = why
        log.error("%s is lost: %s", replica.name, why)

    async def _restart(self, replica: Replica) -> None:
        try:
            log.warning("%s died; restarting it (restart policy '%s')", replica.name, self.restart)
            await self._start_again(replica)
            self._catching_up.add(replica.replica_id)  # not routable until it holds the live state
            try:
                if self.restart == "restore":
                    try:
                        await self._restore(replica)
                    except Exception as e:
                        self._lose(replica, f"it died and restoring its state failed ({type(e).__name__}: {e})")
                        await replica.stop()
                        return
            finally:
                self._catching_up.discard(replica.replica_id)
            replica.restarts += 1
        except Exception:
            log.exception("%s failed to restart; it stays out of service", replica.name)
            await replica.stop()  # never half-alive: a replica that could not take the live state holds nothing
        finally:
            self._restarting.pop(replica.replica_id, None)

    async def _start_again(self, replica: Replica) -> None:
        """Stop what is left of the replica and start a new incarnation. A start-up that fails for a
        reason outside the actor's code (a proc that died while booting, the backend's own error) is
        tried again, up to `options.restart_attempts` times in all: one transient failure must not leave a replica
        out of service for the rest of the run. The actor's own construction/setup error
        (`ActorError`) would fail the same way again, so it is not retried."""
        attempts = self.options.restart_attempts
        for attempt in range(1, attempts + 1):
            replica.generation += 1
            await replica.stop()
            try:
                await replica.start()
                return
            except ActorError:
                raise
            except Exception as e:
                if attempt == attempts or self._closed:
                    raise
                log.warning("%s: restart attempt %d of %d failed (%s: %s); trying again", replica.name, attempt,
                            attempts, type(e).__name__, e)
                await asyncio.sleep(RESTART_BACKOFF_S * attempt)

    async def _restore(self, replica: Replica) -> None:
        """Bring a restarted replica back to the state kept from its previous incarnation (none
        kept: it died before any state-changing call, so its fresh state is the right one)."""
        snap = self._snapshots.get(replica.replica_id)
        if snap is None:
            return
        for rank, state in enumerate(snap[1]):
            await asyncio.wait_for(replica.call("load_state_dict", (state,), {}, rank), self.options.timeout_s)
        log.warning("%s restored to its state before it died", replica.name)

    async def _after_call(self, replica: Replica, endpoint: str) -> None:
        """Under restart='restore': keep the replica's state after a call that changed it."""
        if endpoint not in self._state_endpoints:
            return
        seq = next(self._snap_seq)
        try:
            state = await asyncio.wait_for(replica.call("state_dict", (), {}, None), self.options.timeout_s)
        except (TimeoutError, ReplicaDeadError):
            return  # died right after the call: restored to the previous snapshot
        if seq > self._snapshots.get(replica.replica_id, (-1, None))[0]:  # concurrent calls: the latest wins
            self._snapshots[replica.replica_id] = (seq, list(state))

    # ---- calls ----------------------------------------------------------------------------
    async def _call_replica(self, replica: Replica, endpoint: str, args: tuple, kwargs: dict, rank: int | None) -> list[Any]:
        replica.inflight += 1
        gen = replica.generation
        try:
            return await asyncio.wait_for(replica.call(endpoint, args, kwargs, rank), self.options.timeout_s)
        except TimeoutError:
            err = CallTimeoutError(
                f"{self.name}.{endpoint} on replica {replica.replica_id} did not answer within "
                f"{self.options.timeout_s:g}s (options(timeout_s=...) sets the bound)"
            )
            why = await self._unresponsive(replica)
            if why is None:
                raise err from None  # the replica answers: the endpoint itself is slow
            self._on_dead(replica, gen)
            raise ReplicaDeadError(f"{err}, and then not a liveness probe either ({why}): "
                                   f"marked dead and replaced") from err
        finally:
            replica.inflight -= 1

    async def _unresponsive(self, replica: Replica) -> str | None:
        """None if the replica answers a probe in time, else why not."""
        timeout = min(PROBE_TIMEOUT_S, self.options.timeout_s)
        try:
            await asyncio.wait_for(replica.probe(timeout), timeout + 1.0)
        except (TimeoutError, CallTimeoutError):
            return f"no answer within {timeout:g}s"
        except ReplicaDeadError as e:
            return str(e)
        return None

    async def route(self, endpoint: str, args: tuple, kwargs: dict, sess_id: str | None = None,
                    rank: int | None = None, all_ranks: bool = False) -> Any:
        """One replica (sticky for a session, else least loaded); retried if it dies."""
        self._check_endpoint(endpoint)
        sess_id = sess_id if sess_id is not None else _current_session.get()
        tried: set[int] = set()
        last: Exception | None = None
        for _ in range(self.options.max_retries + 1):
            await self._wait_for_any_healthy()
            try:
                replica = self._pick(sess_id, tried)
            except NoHealthyReplicaError as e:
                if last is not None:
                    raise type(e)(f"{e}; last failure: {last}") from last
                raise
            gen = replica.generation
            try:
                results = await self._call_replica(replica, endpoint, args, kwargs, rank)
                await self._after_call(replica, endpoint)
                return results if all_ranks else results[0]
            except ReplicaDeadError as e:
                last = e
                tried.add(replica.replica_id)
                self._on_dead(replica, gen)
                if len(tried) >= len(self.replicas):
                    tried.clear()  # all tried: wait for a restart and try again
                    await self._wait_for_restart()
        raise ReplicaDeadError(
            f"{self.name}.{endpoint}: gave up after {self.options.max_retries + 1} attempts; last failure: {last}"
        ) from last

    async def _wait_for_restart(self) -> None:
        if self._restarting:
            await asyncio.wait(list(self._restarting.values()))

    async def fanout(self, endpoint: str, args: tuple, kwargs: dict) -> list[Any]:
        """Every healthy replica; the results of those that answered, in replica order.

        A replica that dies (or hangs) during the call is skipped: it is being replaced, and its
        replacement comes back under the service's restart policy (a generator restores the
        newest weights). Raises `NoHealthyReplicaError` only when no replica answered."""
        self._check_endpoint(endpoint)
        await self._wait_for_any_healthy()
        healthy = self._healthy()
        if not healthy:
            raise self._no_replica(f"no healthy replica for fanout of '{endpoint}'")
        dead: list[str] = []

        async def one(r: Replica) -> tuple[bool, Any]:
            gen = r.generation
            try:
                out = (await self._call_replica(r, endpoint, args, kwargs, None))[0]
                await self._after_call(r, endpoint)
                return True, out
            except ReplicaDeadError as e:
                self._on_dead(r, gen)
                dead.append(f"replica {r.replica_id}: {e}")
                log.warning("%s.%s: skipping replica %d, which died during the fanout (%s)",
                            self.name, endpoint, r.replica_id, e)
                return False, None

        got = await asyncio.gather(*(one(r) for r in healthy))
        if not any(ok for ok, _ in got):
            raise NoHealthyReplicaError(f"{self.name}: every replica died during the fanout of '{endpoint}': "
                                        + "; ".join(dead))
        return [v for ok, v in got if ok]

    def _check_endpoint(self, endpoint: str) -> None:
        if endpoint not in self.endpoints:
            raise AttributeError(
                f"{self.name} has no endpoint '{endpoint}' (endpoints: {sorted(self.endpoints)}); "
                "did you forget @endpoint?"
            )

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[str]:
        sess_id = uuid.uuid4().hex
        token = _current_session.set(sess_id)
        try:
            yield sess_id
        finally:
            _current_session.reset(token)
            self.sessions.pop(sess_id, None)

    async def drain_metrics(self) -> list[Any]:
        out: list[Any] = []
        for r in self._healthy():
            try:
                out.extend(await r.drain_metrics())
            except Exception:  # metrics never take a run down
                log.debug("metric drain failed on %s", r.name, exc_info=True)
        return out

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        for t in list(self._restarting.values()):
            t.cancel()
        await asyncio.gather(*(r.stop() for r in self.replicas), return_exceptions=True)
        self.provisioner.unregister(self)


# ---- handles --------------------------------------------------------------------------------


class _ServiceEndpoint:
    def __init__(self, service: Service, name: str):
        self._service, self._name = service, name

    async def route(self, *args: Any, sess_id: str | None = None, **kwargs: Any) -> Any:
        return await self._service.route(self._name, args, kwargs, sess_id=sess_id)

    async def fanout(self, *args: Any, **kwargs: Any) -> list[Any]:
        return await self._service.fanout(self._name, args, kwargs)

    def _wrong(self, adverb: str) -> AdverbError:
        return AdverbError(
            f"{self._service.name}.{self._name}.{adverb}(): {self._service.name} runs as a service "
            "(as_service); use .route() for one replica or .fanout() for all"
        )

    async def call_one(self, *a: Any, **k: Any) -> Any:
        raise self._wrong("call_one")

    async def call(self, *a: Any, **k: Any) -> Any:
        raise self._wrong("call")

    async def choose(self, *a: Any, **k: Any) -> Any:
        raise self._wrong("choose")

    async def broadcast(self, *a: Any, **k: Any) -> Any:
        raise self._wrong("broadcast")


class ServiceHandle:
    """What `as_service()` returns: `handle.<endpoint>.route(...)` / `.fanout(...)`."""

    def __init__(self, service: Service):
        self._service = service

    def __getattr__(self, name: str) -> _ServiceEndpoint:
        if name.startswith("_"):
            raise AttributeError(name)
        self._service._check_endpoint(name)
        return _ServiceEndpoint(self._service, name)

    def session(self) -> contextlib.AbstractAsyncContextManager[str]:
        return self._service.session()

    async def shutdown(self) -> None:
        await self._service.shutdown()

    @property
    def num_replicas(self) -> int:
        return len(self._service.replicas)

    @property
    def restarting(self) -> bool:
        """Whether a replica is being replaced now."""
        return bool(self._service._restarting)

    async def kill_replica(self, replica_id: int) -> None:
        """Kill a replica as a crash would (failure tests, chaos runs)."""
        await self._service.replicas[replica_id].kill()


class _ActorEndpoint:
    def __init__(self, service: Service, name: str):
        self._service, self._name = service, name

    async def call_one(self, *args: Any, **kwargs: Any) -> Any:
        procs = self._service.options.procs
        if procs != 1:
            raise AdverbError(
                f"{self._service.name}.{self._name}.call_one(): the actor has {procs} procs; "
                "use .call() for all of them or .choose() for one"
            )
        return await self._service.route(self._name, args, kwargs)

    async def call(self, *args: Any, **kwargs: Any) -> list[Any]:
        return await self._service.route(self._name, args, kwargs, all_ranks=True)

    async def choose(self, *args: Any, **kwargs: Any) -> Any:
        rank = random.randrange(self._service.options.procs)
        return await self._service.route(self._name, args, kwargs, rank=rank)

    async def broadcast(self, *args: Any, **kwargs: Any) -> None:
        """Fire and forget on all procs; errors are logged, not raised."""
        task = asyncio.ensure_future(self._service.route(self._name, args, kwargs, all_ranks=True))
        task.add_done_callback(lambda t: t.cancelled() or (t.exception() and log.error(
            "broadcast %s.%s failed: %s", self._service.name, self._name, t.exception())))

    def _wrong(self, adverb: str) -> AdverbError:
        return AdverbError(
            f"{self._service.name}.{self._name}.{adverb}(): {self._service.name} runs as an actor "
            "(as_actor); use .call_one(), .call(), .choose() or .broadcast()"
        )

    async def route(self, *a: Any, **k: Any) -> Any:
        raise self._wrong("route")

    async def fanout(self, *a: Any, **k: Any) -> Any:
        raise self._wrong("fanout")


class ActorHandle:
    """What `as_actor()` returns: one replica of `procs` procs."""

    def __init__(self, service: Service):
        self._service = service

    def __getattr__(self, name: str) -> _ActorEndpoint:
        if name.startswith("_"):
            raise AttributeError(name)
        self._service._check_endpoint(name)
        return _ActorEndpoint(self._service, name)

    async def shutdown(self) -> None:
        await self._service.shutdown()

    async def kill_replica(self, replica_id: int = 0) -> None:
        await self._service.replicas[replica_id].kill()
