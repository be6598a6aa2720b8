"""Restart policies: a dead replica is restarted fresh (`stateless`), restarted and restored to
the state the service kept (`restore`), or lost with a clear error (`fail`) — never served from
reset state (issue 29 item 6)."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from forge.controller import ForgeActor, ReplicaLostError, endpoint, init_provisioner, shutdown


class Counter(ForgeActor):
    restart_policy = "restore"

    def __init__(self, start: int = 0, fail_restore: bool = False):
        self.value = start
        self.fail_restore = fail_restore

    @endpoint(changes_state=True)
    async def add(self, x: int) -> int:
        self.value += x
        return self.value

    @endpoint
    async def get(self) -> int:
        return self.value

    @endpoint
    async def state_dict(self) -> dict:
        return {"value": self.value}

    @endpoint(changes_state=True)
    async def load_state_dict(self, state: dict) -> None:
        if self.fail_restore:
            raise RuntimeError("cannot restore")
        self.value = state["value"]


async def _wait_restarted(svc, rid: int, restarts: int = 1) -> None:
    r = svc._service.replicas[rid]
    deadline = time.monotonic() + 20
    while not (r.healthy and r.restarts == restarts and rid not in svc._service._restarting):
        assert time.monotonic() < deadline, "replica never came back"
        await asyncio.sleep(0.01)


def run(coro):
    init_provisioner("local")
    try:
        return asyncio.run(coro)
    finally:
        asyncio.run(shutdown())


def test_restore_brings_back_the_kept_state():
    adds = [random.randint(1, 1000) for _ in range(5)]

    async def main() -> None:
        c = await Counter.options().as_actor(start=3)
        for x in adds:
            await c.add.call_one(x)
        await c.get.call_one()  # a read: keeps the state as it is
        await c.kill_replica()
        await _wait_restarted(c, 0)
        assert await c.get.call_one() == 3 + sum(adds)  # not the constructor's 3
        await c.add.call_one(1)
        await c.kill_replica()  # and again, from the state after the restore
        await _wait_restarted(c, 0, restarts=2)
        assert await c.get.call_one() == 4 + sum(adds)

    run(main())


def test_stateless_restart_is_fresh():
    async def main() -> None:
        c = await Counter.options(restart="stateless").as_actor(start=3)
        await c.add.call_one(random.randint(1, 100))
        await c.kill_replica()
        await _wait_restarted(c, 0)
        assert await c.get.call_one() == 3

    run(main())


def test_fail_policy_loses_the_replica_with_a_clear_error():
    async def main() -> None:
        c = await Counter.options(restart="fail").as_actor(start=3)
        await c.add.call_one(5)
        await c.kill_replica()
        with pytest.raises(ReplicaLostError, match=r"Counter\[replica 0\] is lost: .*restart policy is 'fail'"):
            await c.get.call_one()
        await asyncio.sleep(0.05)
        assert c._service.replicas[0].restarts == 0 and not c._service.replicas[0].healthy

    run(main())


def test_failed_restore_loses_the_replica_and_the_others_serve():
    async def main() -> None:
        svc = await Counter.options(num_replicas=2).as_service(start=0, fail_restore=True)
        await svc.add.fanout(7)
        await svc.kill_replica(0)
        deadline = time.monotonic() + 20
        while svc._service.replicas[0].lost is None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert "restoring its state failed" in svc._service.replicas[0].lost
        assert [await svc.get.route() for _ in range(4)] == [7] * 4  # replica 1 only, never a reset 0
        await svc.kill_replica(1)
        with pytest.raises(ReplicaLostError, match="restoring its state failed"):
            for _ in range(50):  # replica 1 restarts and fails to restore too
                await svc.get.route()
                await asyncio.sleep(0.02)

    run(main())


def test_a_restart_whose_start_up_fails_once_is_tried_again():
    """A backend failure while the new incarnation boots (a CI run: the replacement generator's
    start raised inside Monarch) is retried, and the replica comes back restored; before, one such
    failure left it out of service for the rest of the run."""
    from forge.controller.errors import ForgeRuntimeError

    fails = random.randint(1, 2)  # restart_attempts is 3 by default: one or two failed start-ups are absorbed

    async def main() -> None:
        c = await Counter.options().as_actor(start=0)
        x = random.randint(1, 1000)
        await c.add.call_one(x)
        r = c._service.replicas[0]
        real_start, tries = r.start, []

        async def flaky_start() -> None:
            tries.append(r.generation)
            if len(tries) <= fails:
                raise ForgeRuntimeError(f"{r.name}: failed to start: boot {len(tries)} lost its proc")
            await real_start()

        r.start = flaky_start
        await c.kill_replica()
        await _wait_restarted(c, 0)
        assert len(tries) == fails + 1 and tries == sorted(set(tries))  # a new generation per try
        assert await c.get.call_one() == x

    run(main())


def test_restart_attempts_bounds_the_start_up_tries():
    """`restart_attempts` (a service option, like max_retries) is the number of start-up tries:
    at 2, two failed boots leave the replica out of service and its twin serves."""
    from forge.controller.errors import ForgeRuntimeError

    async def main() -> None:
        svc = await Counter.options(num_replicas=2, restart_attempts=2).as_service(start=0)
        r = svc._service.replicas[0]
        tries = []

        async def failing_start() -> None:
            tries.append(r.generation)
            raise ForgeRuntimeError(f"{r.name}: failed to start: boot {len(tries)} lost its proc")

        r.start = failing_start
        await svc.kill_replica(0)
        deadline = time.monotonic() + 20
        while 0 in svc._service._restarting or not tries:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert len(tries) == 2 and not r.healthy
        x = random.randint(1, 1000)
        assert await svc.add.route(x) == x  # replica 1 serves

    run(main())
    with pytest.raises(ValueError, match="restart_attempts must be >= 1, got 0"):
        Counter.options(restart_attempts=0)


def test_a_restart_whose_actor_setup_raises_is_not_retried():
    """The actor's own construction/setup error would fail the same way again: one try, then the
    replica stays out of service and the other replica serves."""

    starts = []

    class SetupFailsOnRestart(ForgeActor):
        async def setup(self) -> None:
            starts.append(1)
            if len(starts) > 2:  # the two first incarnations start; every restart fails
                raise RuntimeError("bad setup")

        @endpoint
        async def ping(self) -> int:
            return 1

    async def main() -> None:
        svc = await SetupFailsOnRestart.options(num_replicas=2).as_service()
        await svc.kill_replica(0)
        deadline = time.monotonic() + 20
        while 0 in svc._service._restarting or len(starts) < 3:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert len(starts) == 3 and not svc._service.replicas[0].healthy
        assert [await svc.ping.route() for _ in range(3)] == [1, 1, 1]

    run(main())


def test_restore_needs_state_endpoints():
    class Bare(ForgeActor):
        @endpoint
        async def ping(self) -> int:
            return 1

    async def main() -> None:
        with pytest.raises(ValueError, match="restart='restore' needs endpoints state_dict"):
            await Bare.options(restart="restore").as_actor()

    run(main())
    with pytest.raises(ValueError, match="restart must be one of"):
        Counter.options(restart="sometimes")


def test_restarted_dataset_continues_where_it_was():
    from forge.actors import DatasetActor

    async def main() -> None:
        seed = random.randint(0, 10_000)
        ref = await DatasetActor.as_actor(task="arithmetic", seed=seed)
        want = [(await ref.sample.call_one())["request"] for _ in range(12)]
        ds = await DatasetActor.as_actor(task="arithmetic", seed=seed)
        got = [(await ds.sample.call_one())["request"] for _ in range(5)]
        await ds.kill_replica()
        await _wait_restarted(ds, 0)
        got += [(await ds.sample.call_one())["request"] for _ in range(7)]
        assert got == want

    run(main())


def test_restarted_env_sampler_continues_where_it_was():
    from apps.grpo.agentic import EnvSampler
    from tests.test_grpo_agentic import ENV

    async def main() -> None:
        a = await EnvSampler.as_actor(env=ENV)
        n = random.randint(2, 6)
        first = [(await a.sample.call_one())["index"] for _ in range(n)]
        await a.kill_replica()
        await _wait_restarted(a, 0)
        assert first + [(await a.sample.call_one())["index"] for _ in range(3)] == list(range(n + 3))

    run(main())


def test_generator_restore_fetches_its_version_or_the_newest():
    """A restarted generator asks the transport for the version it held; when the trainer pushed
    again meanwhile (that version is gone), it takes the newest, labelled as such. Weights it was
    handed directly, or received by broadcast, cannot be fetched again: a clear error."""
    import torch

    from forge.actors.generator import Generator
    from forge.models import build_tiny_model
    from forge.weight_sync import WeightPublisher, WeightSyncError, clear_registry

    name = f"restore-{random.randint(0, 1 << 30)}"
    trainer = build_tiny_model("qwen2", seed=random.randint(1, 1000))

    async def main() -> None:
        g = Generator(model=build_tiny_model("qwen2", seed=0), weight_sync={"transport": "inproc", "name": name})
        try:
            pub = WeightPublisher(trainer, "inproc", name=name)
            pub.publish(3)  # version 2, which the dead replica held, was replaced by 3
            await g.load_state_dict({"version": 2, "fetched": True})
            assert await g.get_version() == 3
            assert torch.equal(g.engine.model.lm_head.weight, trainer.lm_head.weight)
            with pytest.raises(WeightSyncError, match="passed to update_weights as a state_dict"):
                await g.load_state_dict({"version": 4, "fetched": False})
            g.weight_sync["transport"] = "broadcast"
            with pytest.raises(WeightSyncError, match="broadcast"):
                await g.load_state_dict({"version": 4, "fetched": True})
        finally:
            await g.teardown()
            clear_registry(name)

    asyncio.run(main())
