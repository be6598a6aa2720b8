"""The `monarch` backend: every replica is a mesh of real processes spawned through Monarch.

    init_provisioner("monarch")            # or FORGE_PROVISIONER=monarch
    svc = await Policy.options(procs=2, num_replicas=2).as_service(...)

Each replica is one proc mesh (`procs` processes on this host, or with a multi-host job
`hosts` x `procs` on the job's hosts: forge.controller.hosts) running one generic Monarch
actor, `_ForgeHost`, which imports the user's `ForgeActor` class, constructs it with the
runtime context (rank, world_size, replica_id, device), runs `setup()` and serves
`call(endpoint, args, kwargs)`. The user's class never sees Monarch.

Per proc, before anything is imported there, the controller sets RANK, WORLD_SIZE (hosts x
procs), LOCAL_RANK, LOCAL_WORLD_SIZE; before the actor is constructed MASTER_ADDR (the replica's
first host as the others reach it: 127.0.0.1 on this host) and a MASTER_PORT the OS picked free
there (so `torch.distributed.init_process_group()` works inside a replica, across hosts, and two
jobs on one host never clash), CUDA_VISIBLE_DEVICES (one distinct GPU per proc when `with_gpus`) and
PYTHONPATH (the controller's import path, so classes defined in tests/scripts import there).

Failures:
- an endpoint that raises -> `ActorError` in the caller (class, endpoint, replica, rank, the
  original type and message, and the remote traceback); the replica keeps running;
- a proc (or a job's host) that dies -> noticed by a pid watchdog (procs and process-job hosts on
  this machine) (Monarch's own supervision takes ~10 s here)
  and by Monarch supervision errors -> in-flight calls get `ReplicaDeadError`, the Service
  restarts the replica; Monarch's "unhandled fault" hook, which would exit the controller,
  is replaced while forge owns procs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
import socket
import sys
import time
import traceback
import uuid
from dataclasses import dataclass
from typing import Any

import monarch.actor as _monarch_actor
from monarch.actor import Actor, concurrent_endpoint, default_bootstrap_cmd, endpoint, this_host
from monarch.actor import ActorError as _MonarchActorError

from forge.controller.actor import ActorOptions, _base_of, construct_actor, maybe_await
from forge.controller.errors import ActorError, CallTimeoutError, ForgeRuntimeError, ReplicaDeadError, ResourceError
from forge.controller.hosts import Host, HostPool, JobConfig, start_pool
from forge.controller.placement import GpuAllocator, free_port, pid_alive, visible_gpu_ids
from forge.controller.provisioner import Provisioner, _warn_once
from forge.controller.replica import Replica

try:  # where Monarch 0.7 keeps it; a missing name only loses the precise mapping
    from monarch._rust_bindings.monarch_hyperactor.supervision import SupervisionError
except ImportError:  # pragma: no cover
    SupervisionError = RuntimeError  # type: ignore[misc,assignment]

log = logging.getLogger(__name__)


# ---- inside each proc ----------------------------------------------------------------------


@dataclass
class RemoteFailure:
    """An exception raised inside a proc, in a form that always survives the trip back."""

    rank: int
    pid: int
    type_name: str
    message: str
    traceback: str
    exc_bytes: bytes | None  # the exception itself, when it pickles

    @classmethod
    def of(cls, rank: int, e: BaseException) -> RemoteFailure:
        try:
            exc_bytes: bytes | None = pickle.dumps(e)
        except Exception:
            exc_bytes = None
        return cls(rank, os.getpid(), type(e).__name__, str(e), "".join(traceback.format_exception(e)), exc_bytes)

    def original(self) -> BaseException | None:
        if self.exc_bytes is None:
            return None
        try:
            return pickle.loads(self.exc_bytes)
        except Exception:
            return None


def portable_class(cls: type) -> type | tuple[str, str]:
    """How to send `cls` to a proc: by import path where there is one.

    A class of a program run as `python -m pkg.mod` lives in `__main__`; the procs import it
    as `pkg.mod` (its `if __name__ == "__main__"` block does not run there). Anything else is
    sent as the class itself (cloudpickle: by reference if importable, else by value).
    """
    if cls.__module__ == "__main__" and "<locals>" not in cls.__qualname__:
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        if spec is not None and spec.name and spec.name != "__main__":
            return spec.name, cls.__qualname__
    return cls


def _resolve_class(ref: type | tuple[str, str]) -> type:
    if isinstance(ref, type):
        return ref
    import importlib

    module, qualname = ref
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


class _ForgeHost(Actor):
    """The one Monarch actor forge spawns: hosts one instance of the user's ForgeActor."""

    def __init__(self, actor_ref: type | tuple[str, str], init_kwargs: dict[str, Any], replica_id: int, with_gpus: bool):
        self.actor_ref, self.init_kwargs = actor_ref, init_kwargs
        self.replica_id, self.with_gpus = replica_id, with_gpus
        self.rank = int(os.environ.get("RANK", "0"))
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.instance: Any = None

    @endpoint
    async def boot(self) -> tuple[int, int, str, int]:
        """(rank, pid, machine, a free port there): the controller needs the pids to detect deaths
        and to kill for real, and rank 0's machine and port to form the replica's process group."""
        import socket

        return self.rank, os.getpid(), socket.gethostname(), free_port("")

    @endpoint
    async def construct(self, master_addr: str, master_port: int) -> RemoteFailure | None:
        # the rendezvous of the replica's process group: its first host, reachable from the others
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = master_addr, str(master_port)
        try:
            import torch

            device = torch.device("cuda", 0) if self.with_gpus and torch.cuda.is_available() else torch.device("cpu")
            if device.type == "cuda":
                torch.cuda.set_device(device)
            self.instance = construct_actor(_resolve_class(self.actor_ref), self.init_kwargs, rank=self.rank, world_size=self.world_size,
                                            replica_id=self.replica_id, device=device)
            await maybe_await(self.instance.setup())
        except Exception as e:
            return RemoteFailure.of(self.rank, e)
        return None

    @concurrent_endpoint  # calls run concurrently on the proc's loop, as on the local backend
    async def call(self, endpoint_name: str, args: tuple, kwargs: dict) -> tuple[bool, Any]:
        if self.instance is None:
            return False, RemoteFailure.of(self.rank, RuntimeError("actor was not constructed"))
        try:
            return True, await maybe_await(getattr(self.instance, endpoint_name)(*args, **kwargs))
        except Exception as e:
            return False, RemoteFailure.of(self.rank, e)

    @concurrent_endpoint  # answered while long calls run: only a hung/stopped process stays silent
    async def ping(self) -> int:
        return os.getpid()

    @endpoint
    async def drain_metrics(self) -> list[Any]:
        from forge.observability.metrics import drain

        return drain()

    @endpoint
    async def teardown(self) -> None:
        if self.instance is not None:
            try:
                await maybe_await(self.instance.teardown())
            finally:
                self.instance = None


# ---- Monarch's fault hook ------------------------------------------------------------------
# Monarch calls `monarch.actor.unhandled_fault_hook` on the controller when an owned mesh
# fails; its default exits the process. forge restarts dead replicas instead, so while a
# MonarchProvisioner exists the hook marks the replica dead and returns (= handled).

_live_meshes: dict[str, MonarchReplica] = {}  # proc/actor mesh name -> replica
_retired_meshes: set[str] = set()
_job_meshes: set[str] = set()  # the host meshes of multi-host jobs: a host's death is its replicas' (watchdog)
_previous_hook: Any = None
_active_provisioners = 0


def _fault_hook(failure: Any) -> None:
    name = str(getattr(failure, "mesh_name", "")).lower()  # Monarch lower-cases mesh names
    for mesh, replica in list(_live_meshes.items()):
        if name.startswith(mesh):
            replica._mark_dead_threadsafe(f"Monarch supervision: {failure}")
            return
    if any(name.startswith(m) for m in _job_meshes):
        log.warning("monarch reported a host failure (its replicas are restarted on live hosts): %s", failure)
        return
    if any(name.startswith(m) for m in _retired_meshes) or name.startswith(("logger-", "setup-")):
        log.debug("monarch failure on a retired/internal mesh: %s", failure)
        return
    # a failure without a mesh name (a dead host's proc-mesh controller): its text names the mesh
    text = str(failure).lower() if name in ("", "<none>", "none") else ""
    if text and any(m in text for m in _retired_meshes):
        log.debug("monarch failure on a retired mesh: %s", failure)
        return
    if _active_provisioners > 0:
        log.warning("monarch reported a failure outside forge's replicas (ignored): %s", failure)
        return
    if _previous_hook is not None:
        _previous_hook(failure)


def _install_fault_hook() -> None:
    global _previous_hook
    if _monarch_actor.unhandled_fault_hook is not _fault_hook:
        _previous_hook = _monarch_actor.unhandled_fault_hook
        _monarch_actor.unhandled_fault_hook = _fault_hook


# ---- the controller side -------------------------------------------------------------------


def _python_path() -> str:
    """The controller's import path, so test modules and scripts import in the procs too."""
    entries = [os.path.abspath(p or os.curdir) for p in sys.path]
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix}
    keep = [p for p in dict.fromkeys(entries) if os.path.isdir(p) and not any(p.startswith(x) for x in prefixes)]
    old = os.environ.get("PYTHONPATH")
    return os.pathsep.join(keep + ([old] if old else []))


async def _await(fut: Any) -> Any:
    return await fut


class MonarchReplica(Replica):
    def __init__(self, actor_cls: type, init_kwargs: dict[str, Any], options: ActorOptions, replica_id: int,
                 provisioner: MonarchProvisioner, gpus: list[str]):
        super().__init__(actor_cls, init_kwargs, options, replica_id)
        self.provisioner = provisioner
        self.gpus = gpus  # held from creation to stop(), so GPU errors come before any spawn
        self.hosts: list[Host] = []  # the job's hosts this replica runs on (none: this host, no job)
        self.pids: list[int] = []
        self.local_pids: list[int] = []  # those of procs on this machine (the pid watchdog's and kill's)
        self.master_addr: str | None = None
        self.master_port: int | None = None
        self.spawn_seconds: float | None = None
        self._procs: Any = None
        self._mesh: Any = None
        self._rank_meshes: list[Any] = []
        self._mesh_name: str | None = None
        self._dead: asyncio.Future | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watch: asyncio.Task | None = None
        self._started = False

    # ---- lifecycle -----------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.options.procs * max(1, len(self.hosts))

    def _env(self, rank: int) -> dict[str, str | None]:
        """Set before anything is imported in the proc; MASTER_ADDR/MASTER_PORT are set again
        from rank 0's own machine and port before the actor is constructed (`construct`)."""
        procs = self.options.procs
        env: dict[str, str | None] = {
            "RANK": str(rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(rank % procs),
            "LOCAL_WORLD_SIZE": str(procs), "MASTER_ADDR": (self.hosts[0].address if self.hosts else None) or "127.0.0.1",
            "MASTER_PORT": str(self.master_port), "FORGE_REPLICA_ID": str(self.replica_id), "PYTHONPATH": _python_path(),
            "FORGE_HOST_INDEX": str(self.hosts[rank // procs].index) if self.hosts else "0",
            # a native crash (SIGSEGV/SIGABRT in torch, gloo, NCCL) prints every thread's Python stack to
            # the proc's stderr; otherwise the controller only sees "process(es) [pid] exited"
            "PYTHONFAULTHANDLER": "1",
        }
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus[rank % procs]
        elif not self.options.with_gpus:
            env["CUDA_VISIBLE_DEVICES"] = ""  # CPU services never grab (or initialise) a GPU
        return env

    async def start(self) -> None:
        prov = self.provisioner
        if self.options.with_gpus and not self.gpus and prov.gpus.total > 0:
            self.gpus = prov.gpus.allocate(self.options.procs, self.name)  # again after a restart
        self.master_port = free_port()
        self._mesh_name = f"forge_{self.actor_cls.__name__}_r{self.replica_id}_{uuid.uuid4().hex[:8]}".lower()
        self._loop = asyncio.get_running_loop()
        self._dead = self._loop.create_future()
        self._started = False
        t0 = time.perf_counter()
        try:
            host_mesh = this_host()
            if prov.pool is not None:
                self.hosts = prov.pool.allocate(self.name, self.options.hosts or 1, self.options.procs, self.options.mesh_name)
                host_mesh = prov.pool.mesh_for(self.hosts)
            self._procs = host_mesh.spawn_procs(
                per_host={"procs": self.options.procs}, name=self._mesh_name,
                bootstrap_command=lambda point: default_bootstrap_cmd().with_env(self._env(point.rank)),
            )
            mesh = self._mesh = self._procs.spawn(self._mesh_name, _ForgeHost, portable_class(_base_of(self.actor_cls)),
                                                  self.init_kwargs, self.replica_id, bool(self.gpus))
            _live_meshes[self._mesh_name] = self
            booted = sorted((await self._guard(mesh.boot.call(), prov.boot_timeout_s, "start-up")).values())
            if self._mesh is not mesh:  # stop() ran while the procs booted: this start-up is void
                raise ReplicaDeadError(f"{self.name} was stopped during start-up")
            self.pids = [b[1] for b in booted]
            here = socket.gethostname()
            self.local_pids = [b[1] for b in booted if b[2] == here]
            procs = self.options.procs
            self._rank_meshes = [mesh.slice(hosts=r // procs, procs=r % procs) if self.hosts
                                 else mesh.slice(procs=r) for r in range(self.world_size)]
            if self.hosts:  # rank 0's host, as the others reach it, and a port free there
                self.master_addr, self.master_port = self.hosts[0].address or booted[0][2], booted[0][3]
            else:
                self.master_addr = "127.0.0.1"
            self._watch = asyncio.ensure_future(self._watchdog(self._dead, list(self.local_pids)))
            outcomes = await self._guard(mesh.construct.call(self.master_addr, self.master_port),
                                         self.options.timeout_s, "construction/setup")
            if self._mesh is not mesh:
                raise ReplicaDeadError(f"{self.name} was stopped during start-up")
            failures = [o for o in self._in_rank_order(outcomes) if o is not None]
            if failures:
                f = failures[0]
                raise ActorError(
                    f"{self.name} rank {f.rank}: construction/setup failed: {f.type_name}: {f.message}\n"
                    f"--- remote traceback (pid {f.pid}) ---\n{f.traceback}", f.original())
        except BaseException as e:
            await self.stop()
            if isinstance(e, (ActorError, asyncio.CancelledError)):
                raise
            raise ForgeRuntimeError(f"{self.name}: failed to start on monarch: {type(e).__name__}: {e}") from e
        self.spawn_seconds = time.perf_counter() - t0
        self._started = True
        self.healthy = True

    async def _watchdog(self, dead: asyncio.Future, pids: list[int]) -> None:
        """Procs on this machine by pid; hosts whose worker is a local process by its pid (a
        remote host's death reaches us through Monarch supervision and failed calls)."""
        while not dead.done():
            await asyncio.sleep(self.provisioner.poll_s)
            gone = [p for p in pids if not pid_alive(p)]
            lost = [h.index for h in self.hosts if not h.alive()]
            if (gone or lost) and dead is self._dead:
                self._mark_dead(f"host(s) {lost} lost" if lost else f"process(es) {gone} exited")
                return

    def _mark_dead_threadsafe(self, reason: str) -> None:
        """From Monarch's fault hook, which may run off the controller's event loop thread. The
        report is about the incarnation live now: by the time the loop runs it, a restart may have
        replaced that one, and the new one must not be marked dead for it."""
        loop, dead = self._loop, self._dead
        if loop is None or loop.is_closed() or dead is None:
            return
        try:
            if asyncio.get_running_loop() is loop:
                self._mark_dead(reason, dead)
                return
        except RuntimeError:
            pass
        loop.call_soon_threadsafe(self._mark_dead, reason, dead)

    def _mark_dead(self, reason: str, incarnation: asyncio.Future | None = None) -> None:
        dead = self._dead
        if dead is None or dead.done() or (incarnation is not None and incarnation is not dead):
            return
        dead.set_result(reason)
        self.healthy = False
        for h in self.hosts:  # a host we cannot check from here is avoided by the restart
            h.suspect = h.suspect or h.pid is None
        if self._started:
            self._started = False
            log.warning("%s died: %s", self.name, reason)
            self.notify_dead()

    async def stop(self) -> None:
        """Teardown, stop the mesh, SIGKILL whatever is left; bounded, never raises."""
        self.healthy = False
        self._started = False  # an intentional stop is not a crash to report
        prov = self.provisioner
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        alive = [p for p in self.local_pids if pid_alive(p)] or (self.pids and not self.local_pids)
        if self._mesh is not None and alive and self._dead is not None and not self._dead.done():
            try:
                await asyncio.wait_for(_await(self._mesh.teardown.call()), prov.stop_timeout_s)
            except BaseException as e:  # noqa: B036 — best effort
                log.debug("%s teardown failed: %s", self.name, e)
        if self._dead is not None and not self._dead.done():
            self._dead.set_result("stopped")  # fail anything still in flight
        if self._procs is not None:
            try:
                await asyncio.wait_for(_await(self._procs.stop()), prov.stop_timeout_s)
            except BaseException as e:  # noqa: B036
                log.debug("%s proc mesh stop failed: %s", self.name, e)
        self._kill_pids()
        if self._mesh_name is not None:
            _live_meshes.pop(self._mesh_name, None)
            _retired_meshes.add(self._mesh_name)
        self._procs = self._mesh = None
        self._rank_meshes = []
        self.pids, self.local_pids = [], []
        if prov.pool is not None and self.hosts:
            prov.pool.release(self.hosts, self.options.procs)
        self.hosts = []
        prov.gpus.release(self.gpus)
        self.gpus = []

    async def kill(self) -> None:
        """SIGKILL every proc of the replica: what a crash looks like from outside."""
        self._kill_pids()
        self._mark_dead("killed")
        self.healthy = False

    def _kill_pids(self) -> None:
        for pid in self.local_pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    # ---- calls ---------------------------------------------------------------------------
    async def _guard(self, fut: Any, timeout: float | None, what: str) -> Any:
        """Await a Monarch future unless the replica dies (or `timeout` passes) first."""
        dead = self._dead
        assert dead is not None
        task = asyncio.ensure_future(_await(fut))
        try:
            done, _ = await asyncio.wait({task, dead}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            raise
        if task in done:
            try:
                return task.result()
            except SupervisionError as e:
                self._mark_dead(f"Monarch supervision error: {e}")
                raise ReplicaDeadError(f"{self.name} died during {what}: {e}") from e
        task.cancel()
        if dead in done:
            raise ReplicaDeadError(f"{self.name} died during {what}: {dead.result()}")
        raise CallTimeoutError(f"{self.name}: {what} did not finish within {timeout:.0f}s")

    def _in_rank_order(self, values: Any) -> list[Any]:
        items = sorted(values.items(), key=lambda kv: kv[0].rank)
        return [v for _, v in items]

    async def call(self, endpoint: str, args: tuple, kwargs: dict, rank: int | None) -> list[Any]:
        dead = self._dead
        if not self.healthy or self._mesh is None or dead is None or dead.done():
            raise ReplicaDeadError(f"{self.name} is dead" + (f" ({dead.result()})" if dead is not None and dead.done() else ""))
        cls = self.actor_cls.__name__
        try:
            if rank is None:
                fut = self._mesh.call.call(endpoint, args, kwargs)
            else:
                if not 0 <= rank < len(self._rank_meshes):
                    raise ValueError(f"rank {rank} out of range for {self.world_size} procs")
                fut = self._rank_meshes[rank].call.call_one(endpoint, args, kwargs)
        except Exception as e:  # nothing was sent: unpicklable arguments and the like
            raise ActorError(f"{cls}.{endpoint}: cannot send the call to replica {self.replica_id}: "
                             f"{type(e).__name__}: {e}", e) from e
        try:
            got = await self._guard(fut, None, endpoint)
        except (ReplicaDeadError, CallTimeoutError):
            raise
        except _MonarchActorError as e:  # the endpoint's result could not come back (pickling)
            inner = getattr(e, "exception", e)
            raise ActorError(f"{cls}.{endpoint} failed on replica {self.replica_id}: {type(inner).__name__}: "
                             f"{inner}\n{getattr(e, 'exception_formatted', '')}", inner) from e
        except Exception as e:
            if not all(pid_alive(p) for p in self.local_pids) or not all(h.alive() for h in self.hosts):
                self._mark_dead(f"{type(e).__name__}: {e}")
                raise ReplicaDeadError(f"{self.name} died during {endpoint}: {e}") from e
            raise ForgeRuntimeError(f"{cls}.{endpoint} on replica {self.replica_id}: monarch call failed: "
                                    f"{type(e).__name__}: {e}") from e
        outcomes = self._in_rank_order(got) if rank is None else [got]
        results = []
        for ok, value in outcomes:
            if not ok:
                f: RemoteFailure = value
                original = f.original()
                err = ActorError(
                    f"{cls}.{endpoint} raised on replica {self.replica_id} rank {f.rank}: {f.type_name}: "
                    f"{f.message}\n--- remote traceback (pid {f.pid}) ---\n{f.traceback}", original)
                err.remote_traceback = f.traceback  # type: ignore[attr-defined]
                if original is not None:
                    raise err from original
                raise err
            results.append(value)
        return results

    async def probe(self, timeout: float) -> None:
        if self._mesh is None or self._dead is None:
            raise ReplicaDeadError(f"{self.name} is not running")
        await self._guard(self._mesh.ping.call(), timeout, "liveness probe")

    async def drain_metrics(self) -> list[Any]:
        if not self.healthy or self._mesh is None:
            return []
        got = await self._guard(self._mesh.drain_metrics.call(), self.provisioner.stop_timeout_s, "drain_metrics")
        return [r for records in self._in_rank_order(got) for r in records]


class MonarchProvisioner(Provisioner):
    """Places each replica on its own proc mesh: on this host, or with `job` on the hosts of a
    Monarch job (forge.controller.hosts: process / attach / slurm / kubernetes, and the keys each
    takes), `hosts` hosts per replica (ActorOptions.hosts) x `procs` procs per host.

    `gpu_count` overrides the number of GPUs a host is taken to have (tests, dry runs);
    `share_gpus` lets processes of different services share a GPU once all are taken. GPUs are
    counted per host (every host of a job is taken to have the same GPUs).
    """

    kind = "monarch"

    def __init__(self, gpu_count: int | None = None, poll_s: float = 0.2, boot_timeout_s: float = 120.0,
                 stop_timeout_s: float = 10.0, share_gpus: bool = False, job: str | None = None, **job_options: Any):
        global _active_provisioners
        from forge.config import ConfigError, build

        try:
            self.job_config = build(JobConfig, {"job": job, **job_options}, path="provisioner")
            self.job_config.validate()
        except ConfigError as e:
            raise ValueError(str(e)) from None
        self.pool: HostPool | None = start_pool(self.job_config) if job is not None else None
        if self.pool is not None:
            _job_meshes.update(name.lower() for name in self.pool.meshes)
        super().__init__()
        # share_gpus: several services' processes on one GPU (e.g. generator + trainer, 1-GPU host)
        self.gpus = (GpuAllocator.with_count(gpu_count, share=share_gpus) if gpu_count is not None
                     else GpuAllocator(visible_gpu_ids(), share=share_gpus))
        self.poll_s, self.boot_timeout_s, self.stop_timeout_s = poll_s, boot_timeout_s, stop_timeout_s
        _install_fault_hook()
        _active_provisioners += 1
        self._closed = False

    def create_replica(self, actor_cls: type, init_kwargs: dict[str, Any], options: ActorOptions, replica_id: int) -> Replica:
        name = f"{actor_cls.__name__}[replica {replica_id}]"
        if self.pool is not None:  # a placement no host group can hold fails before anything spawns
            self.pool.check_fits(name, options.hosts or 1, options.mesh_name)
        elif (options.hosts or 1) > 1:
            raise ResourceError(f"{name} asks for {options.hosts} hosts per replica but the monarch provisioner has "
                                "no job: every replica runs on this one host (set provisioner.job: process | attach "
                                "| slurm | kubernetes)")
        gpus: list[str] = []
        if options.with_gpus:
            if self.gpus.total == 0:  # the same config runs on a laptop, as with the local backend
                _warn_once(f"{actor_cls.__name__} asked for GPUs but none is visible; running it on CPU")
            else:
                gpus = self.gpus.allocate(options.procs, name)
        return MonarchReplica(actor_cls, init_kwargs, options, replica_id, self, gpus)

    async def shutdown(self) -> None:
        global _active_provisioners
        await super().shutdown()
        if not self._closed:
            self._closed = True
            _active_provisioners -= 1
            if self.pool is not None:
                await asyncio.to_thread(self.pool.shutdown)


__all__ = ["MonarchProvisioner", "MonarchReplica", "RemoteFailure", "pid_alive"]
