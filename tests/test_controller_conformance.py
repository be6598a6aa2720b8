"""One conformance suite for every backend of the actor runtime (local, monarch).

Services are spawned once per backend (module-scoped) and shared by the tests: spawning
Monarch procs costs seconds here (each proc imports torch), calls cost well under 1 ms.
"""

from __future__ import annotations

import asyncio
import collections
import importlib.util
import os
import time
from dataclasses import dataclass
from typing import Any

import pytest

from forge.controller import (
    ActorError,
    AdverbError,
    CallTimeoutError,
    ForgeActor,
    ResourceError,
    endpoint,
    init_provisioner,
    shutdown,
)
from forge.observability import MetricLogger, Reduce, drain, record_metric

HAS_MONARCH = importlib.util.find_spec("monarch") is not None


class Worker(ForgeActor):
    def __init__(self, start: int = 0):
        self.value = start
        self.setups = 0

    async def setup(self) -> None:
        self.setups += 1

    @endpoint
    async def incr(self, by: int = 1) -> int:
        self.value += by
        return self.value

    @endpoint
    async def state(self) -> dict[str, Any]:
        return {
            "replica": self.replica_id, "rank": self.rank, "world_size": self.world_size, "value": self.value,
            "setups": self.setups, "pid": os.getpid(), "device": str(self.device),
            "env": {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                  "MASTER_PORT", "CUDA_VISIBLE_DEVICES")},
        }

    @endpoint
    async def work(self, seconds: float) -> int:
        await asyncio.sleep(seconds)
        return self.replica_id

    @endpoint
    async def echo(self, x: int) -> tuple[int, int]:
        await asyncio.sleep(0.001)
        return x, self.replica_id

    @endpoint
    async def fail(self, msg: str) -> None:
        raise ValueError(msg)

    @endpoint
    async def record(self, v: float) -> float:
        record_metric("conformance/sum", v, Reduce.SUM)
        record_metric("conformance/max", v, Reduce.MAX)
        return v

    @endpoint
    async def crash_unless(self, keep: int) -> int:
        if self.replica_id != keep:
            os._exit(3)  # a real process death (monarch only)
        return self.replica_id

    @endpoint
    async def allreduce(self, x: float) -> float:
        import torch
        import torch.distributed as dist

        def run() -> float:
            if not dist.is_initialized():
                dist.init_process_group("gloo")  # env:// from RANK/WORLD_SIZE/MASTER_*
            t = torch.tensor([x])
            dist.all_reduce(t)
            return float(t.item())

        return await asyncio.to_thread(run)


@dataclass
class Runtime:
    kind: str
    loop: asyncio.AbstractEventLoop
    svc: Any  # Worker service, 2 replicas x 1 proc
    actor: Any  # Worker actor, 1 replica x 2 procs
    victim: Any  # Worker service, 2 replicas, with_gpus, short timeout: gets killed
    spawn_seconds: float

    def run(self, coro: Any, timeout: float = 60.0) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module", params=["local", pytest.param("monarch", marks=pytest.mark.monarch)])
def rt(request: pytest.FixtureRequest) -> Runtime:
    kind = request.param
    if kind == "monarch" and not HAS_MONARCH:
        pytest.skip("torchmonarch is not installed")
    loop = asyncio.new_event_loop()
    # a fake 2-GPU host for monarch: the allocation and CUDA_VISIBLE_DEVICES mapping are real
    init_provisioner(kind, **({"gpu_count": 2} if kind == "monarch" else {}))

    async def spawn() -> Runtime:
        t0 = time.perf_counter()
        svc, actor, victim = await asyncio.gather(
            Worker.options(num_replicas=2).as_service(start=100),
            Worker.options(procs=2).as_actor(start=0),
            Worker.options(num_replicas=2, with_gpus=True, timeout_s=1.5).as_service(start=7),
        )
        return Runtime(kind, loop, svc, actor, victim, time.perf_counter() - t0)

    runtime = loop.run_until_complete(asyncio.wait_for(spawn(), 180))
    print(f"\n[{kind}] spawned 3 services (6 procs) in {runtime.spawn_seconds:.2f}s")
    yield runtime
    pids = []
    if kind == "monarch":
        for h in (runtime.svc, runtime.actor, runtime.victim):
            pids += [p for r in h._service.replicas for p in r.pids]
    loop.run_until_complete(asyncio.wait_for(shutdown(), 60))
    loop.close()
    if kind == "monarch":
        from forge.controller.monarch import pid_alive

        assert not [p for p in pids if pid_alive(p)], "shutdown left procs running"


def test_route_least_loaded_spreads(rt: Runtime) -> None:
    async def main() -> None:
        who = await asyncio.gather(*(rt.svc.work.route(0.2) for _ in range(10)))
        assert collections.Counter(who) == {0: 5, 1: 5}  # every pick goes to the idler replica
        seq = [await rt.svc.work.route(0) for _ in range(4)]
        assert set(seq) == {0, 1}  # idle ties are shared round-robin

    rt.run(main())


def test_fanout_reaches_every_replica(rt: Runtime) -> None:
    async def main() -> None:
        states = await rt.svc.state.fanout()
        assert [s["replica"] for s in states] == [0, 1]
        assert rt.svc.num_replicas == 2
        if rt.kind == "monarch":
            assert len({s["pid"] for s in states} | {os.getpid()}) == 3  # real, distinct processes

    rt.run(main())


def test_actor_adverbs_with_two_procs(rt: Runtime) -> None:
    async def main() -> None:
        states = await rt.actor.state.call()
        assert [(s["rank"], s["world_size"]) for s in states] == [(0, 2), (1, 2)]
        chosen = await rt.actor.state.choose()
        assert chosen["rank"] in (0, 1)
        before = [s["value"] for s in await rt.actor.state.call()]
        assert await rt.actor.incr.broadcast(10) is None  # fire and forget
        deadline = time.monotonic() + 10
        while [s["value"] for s in await rt.actor.state.call()] != [v + 10 for v in before]:
            assert time.monotonic() < deadline, "broadcast never reached both procs"
            await asyncio.sleep(0.02)
        with pytest.raises(AdverbError, match="2 procs"):
            await rt.actor.incr.call_one()

    rt.run(main())


def test_wrong_adverbs_and_unknown_endpoint(rt: Runtime) -> None:
    async def main() -> None:
        for adverb in ("call_one", "call", "choose", "broadcast"):
            with pytest.raises(AdverbError, match=r"Worker\.incr\..*as_service"):
                await getattr(rt.svc.incr, adverb)()
        for adverb in ("route", "fanout"):
            with pytest.raises(AdverbError, match=r"as_actor"):
                await getattr(rt.actor.incr, adverb)()
        with pytest.raises(AttributeError, match="no endpoint 'nope'"):
            _ = rt.svc.nope

    rt.run(main())


def test_sessions_are_sticky(rt: Runtime) -> None:
    async def one_session() -> set[int]:
        async with rt.svc.session():
            return {(await rt.svc.echo.route(i))[1] for i in range(8)}

    async def main() -> None:
        seen = await asyncio.gather(*(one_session() for _ in range(4)))
        assert all(len(s) == 1 for s in seen), seen
        assert set().union(*seen) == {0, 1}  # sessions themselves are spread
        sid = "explicit-session"
        first = (await rt.svc.echo.route(0, sess_id=sid))[1]
        assert [(await rt.svc.echo.route(i, sess_id=sid))[1] for i in range(5)] == [first] * 5

    rt.run(main())


def test_endpoint_exception_raised_in_caller_state_kept(rt: Runtime) -> None:
    async def main() -> None:
        before = {s["replica"]: s for s in await rt.svc.state.fanout()}
        await rt.svc.incr.fanout(1)
        for _ in range(2):  # land on both replicas
            with pytest.raises(ActorError) as info:
                await rt.svc.fail.route("the disk is on fire")
            msg = str(info.value)
            assert "Worker.fail" in msg and "replica" in msg and "rank 0" in msg
            assert "ValueError: the disk is on fire" in msg
            assert isinstance(info.value.original, ValueError)
            if rt.kind == "monarch":
                assert "remote traceback" in msg and "in fail" in msg
        after = {s["replica"]: s for s in await rt.svc.state.fanout()}
        for rid in (0, 1):  # same processes, state kept, no restart, no second setup
            assert after[rid]["value"] == before[rid]["value"] + 1
            assert after[rid]["pid"] == before[rid]["pid"]
            assert after[rid]["setups"] == 1
        assert all(r.restarts == 0 for r in rt.svc._service.replicas)

    rt.run(main())


def test_timeout_raises_and_replica_keeps_serving(rt: Runtime) -> None:
    async def main() -> None:
        t0 = time.perf_counter()
        with pytest.raises(CallTimeoutError, match=r"Worker\.work .*within 1\.5s"):
            await rt.victim.work.route(30)
        assert time.perf_counter() - t0 < 10
        assert [(await rt.victim.echo.route(i))[0] for i in range(4)] == [0, 1, 2, 3]

    rt.run(main())


def test_many_concurrent_requests(rt: Runtime) -> None:
    async def main() -> None:
        n = 150
        got = await asyncio.gather(*(rt.svc.echo.route(i) for i in range(n)))
        assert [x for x, _ in got] == list(range(n))
        assert set(collections.Counter(r for _, r in got)) == {0, 1}
        got = await asyncio.gather(*(rt.actor.echo.call(i) for i in range(100)))
        assert all(pair == [(i, 0), (i, 0)] for i, pair in enumerate(got))

    rt.run(main())


def test_metrics_from_actors_reach_logger(rt: Runtime) -> None:
    async def main() -> None:
        logger = MetricLogger([])
        await logger.flush(0)  # whatever earlier tests recorded
        drain()
        await asyncio.gather(*(rt.svc.record.route(float(v)) for v in range(1, 11)))
        await rt.actor.record.call(100.0)  # both procs of the actor
        metrics = await logger.flush(1)
        assert metrics["conformance/sum"] == pytest.approx(55.0 + 200.0)
        assert metrics["conformance/max"] == 100.0
        assert "conformance/sum" not in await logger.flush(2)  # drained, not counted twice

    rt.run(main())


def test_killed_replica_recovers(rt: Runtime) -> None:
    svc = rt.victim
    replicas = svc._service.replicas

    async def main() -> None:
        await svc.incr.fanout(5)  # state 12 on both
        old = {s["replica"]: s for s in await svc.state.fanout()}
        sid = "pinned"
        while (await svc.echo.route(0, sess_id=sid))[1] != 0:  # pin a session on replica 0
            svc._service.sessions.pop(sid, None)
        await svc.kill_replica(0)
        assert (await svc.echo.route(0, sess_id=sid))[1] == 1  # the session moved
        # calls keep succeeding right away: on replica 1 while 0 restarts
        got = await asyncio.gather(*(svc.echo.route(i) for i in range(6)))
        assert [x for x, _ in got] == list(range(6))
        deadline = time.monotonic() + 90
        while not (replicas[0].healthy and replicas[0].restarts == 1):
            assert time.monotonic() < deadline, "killed replica never came back"
            await asyncio.sleep(0.05)
        new = {s["replica"]: s for s in await svc.state.fanout()}
        assert new[0]["value"] == 7 and new[0]["setups"] == 1  # fresh instance, setup re-run
        assert new[1]["value"] == old[1]["value"]  # the survivor kept its state
        assert (await svc.echo.route(1, sess_id=sid))[1] == 1  # and the session stays put
        if rt.kind == "monarch":
            from forge.controller.monarch import pid_alive

            assert not pid_alive(old[0]["pid"]), "kill() must kill the process for real"
            assert new[0]["pid"] != old[0]["pid"]

    rt.run(main(), timeout=120)


def test_process_crash_mid_call_is_retried(rt: Runtime) -> None:
    if rt.kind != "monarch":
        pytest.skip("an os._exit inside an in-process actor would end the test run")
    svc = rt.victim
    replicas = svc._service.replicas

    async def main() -> None:
        deadline = time.monotonic() + 90
        while not all(r.healthy for r in replicas):  # after the previous test's restart
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        restarts = replicas[0].restarts
        t0 = time.perf_counter()
        # both calls go out at once, so replica 0 gets one: its process exits mid-call,
        # the caller sees nothing but the answer from replica 1
        assert await asyncio.gather(svc.crash_unless.route(1), svc.crash_unless.route(1)) == [1, 1]
        assert time.perf_counter() - t0 < 10
        while replicas[0].restarts != restarts + 1 or not replicas[0].healthy:
            assert time.monotonic() < deadline, "crashed replica never came back"
            await asyncio.sleep(0.05)

    rt.run(main(), timeout=120)


def test_monarch_proc_env_and_gpu_mapping(rt: Runtime) -> None:
    if rt.kind != "monarch":
        pytest.skip("per-proc env is the monarch backend's")

    async def main() -> None:
        ranks = await rt.actor.state.call()
        envs = [s["env"] for s in ranks]
        assert [e["RANK"] for e in envs] == ["0", "1"] and {e["WORLD_SIZE"] for e in envs} == {"2"}
        assert envs[0]["MASTER_PORT"] == envs[1]["MASTER_PORT"] and envs[0]["MASTER_ADDR"] == "127.0.0.1"
        assert envs[0]["CUDA_VISIBLE_DEVICES"] == ""  # a CPU service sees no GPU
        assert await rt.actor.allreduce.call(1.5) == [3.0, 3.0]  # a real gloo group
        victims = await rt.victim.state.fanout()
        assert sorted(s["env"]["CUDA_VISIBLE_DEVICES"] for s in victims) == ["0", "1"]
        ports = {s["env"]["MASTER_PORT"] for s in victims + await rt.svc.state.fanout()} | {envs[0]["MASTER_PORT"]}
        assert len(ports) == 5  # one free port per replica
        with pytest.raises(ResourceError, match=r"needs 1 GPU.*host has 2"):
            await Worker.options(with_gpus=True).as_service()

    rt.run(main())


def test_gpu_sharing_places_extra_procs_on_the_least_loaded_gpu():
    from forge.controller.errors import ResourceError
    from forge.controller.placement import GpuAllocator

    strict = GpuAllocator.with_count(1)
    assert strict.allocate(1, "generator") == ["0"]
    with pytest.raises(ResourceError, match="trainer needs 1 GPU"):
        strict.allocate(1, "trainer")
    shared = GpuAllocator.with_count(2, share=True)
    assert shared.allocate(1, "generator") == ["0"]
    assert shared.allocate(1, "trainer") == ["1"]
    assert shared.allocate(1, "ref") == ["0"]  # both taken: shares the least-loaded one
    with pytest.raises(ResourceError):
        shared.allocate(3, "too-big")
    shared.release(["0"])
    shared.release(["0"])
    assert "0" in shared.free
