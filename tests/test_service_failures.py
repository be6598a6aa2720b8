"""Replica failures during a fanout or a call (issue 29 item 4): `fanout` skips a replica that
dies mid-call instead of raising; a call that times out on a replica that does not answer a
liveness probe (a hung or SIGSTOPped process) marks it dead, replaces it and retries elsewhere;
a replacement is restored (restart policy 'restore') to the state it held before it takes calls.

The local backend runs the logic in-process (a hang is simulated by a probe that never answers);
the monarch backend does it with real processes and real `SIGKILL` / `SIGSTOP`.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import random
import signal
import time

import pytest

from forge.controller import CallTimeoutError, ForgeActor, endpoint, init_provisioner, shutdown

HAS_MONARCH = importlib.util.find_spec("monarch") is not None


class Holder(ForgeActor):
    """Holds a value (the 'weights version'); `set` may be slow so that a kill lands mid-call."""

    restart_policy = "restore"

    def __init__(self) -> None:
        self.value = 0

    @endpoint(changes_state=True)
    async def set(self, value: int, seconds: float = 0.0) -> int:
        await asyncio.sleep(seconds)
        self.value = value
        return self.replica_id

    @endpoint
    async def state_dict(self) -> dict[str, int]:
        return {"value": self.value}

    @endpoint
    async def load_state_dict(self, state: dict[str, int]) -> None:
        self.value = state["value"]

    @endpoint
    async def get(self) -> tuple[int, int, int]:
        return self.replica_id, self.value, os.getpid()

    @endpoint
    async def hang_unless(self, keep: int) -> int:
        if self.replica_id != keep:
            await asyncio.sleep(3600)
        return self.replica_id


async def _wait(cond, what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


def test_fanout_skips_a_replica_killed_mid_call_and_the_replacement_gets_the_live_state():
    async def main() -> None:
        init_provisioner("local")
        svc = await Holder.options(num_replicas=3).as_service()
        replicas = svc._service.replicas
        held, value = random.sample(range(1, 10**6), 2)
        await svc.set.fanout(held)  # what every replica holds before the crash
        victim = random.randrange(3)
        fan = asyncio.ensure_future(svc.set.fanout(value, seconds=0.3))
        await asyncio.sleep(0.05)
        await svc.kill_replica(victim)  # mid-fanout, as a crash during a weight sync
        answered = await fan  # the old fanout re-raised ReplicaDeadError here
        assert sorted(answered) == sorted(set(range(3)) - {victim})
        await _wait(lambda: replicas[victim].healthy and replicas[victim].restarts == 1, "never replaced")
        # the replacement holds what the dead replica held (not the constructor's 0)
        assert sorted(await svc.get.fanout()) == [(r, held if r == victim else value, os.getpid()) for r in range(3)]
        await shutdown()

    asyncio.run(main())


def test_timed_out_call_on_an_unresponsive_replica_is_retried_and_the_replica_replaced():
    async def main() -> None:
        init_provisioner("local")
        svc = await Holder.options(num_replicas=2, timeout_s=0.5).as_service()
        replicas = svc._service.replicas
        hung = random.randrange(2)

        async def never_answers(timeout: float) -> None:  # what a SIGSTOPped process looks like
            await asyncio.sleep(3600)

        replicas[hung].probe = never_answers
        t0 = time.perf_counter()
        # both calls go out at once, so the hung replica gets one: it is declared dead, the call
        # retried on the other replica (the old code raised CallTimeoutError)
        got = await asyncio.gather(svc.hang_unless.route(1 - hung), svc.hang_unless.route(1 - hung))
        assert got == [1 - hung, 1 - hung] and time.perf_counter() - t0 < 5
        await _wait(lambda: replicas[hung].restarts == 1 and replicas[hung].healthy, "hung replica never replaced")
        del replicas[hung].probe  # the replacement answers
        # a replica that answers the probe is only slow: CallTimeoutError, kept, not restarted
        with pytest.raises(CallTimeoutError, match=r"Holder\.hang_unless .*within 0\.5s"):
            await svc.hang_unless.route(-1)
        assert [r.restarts for r in replicas] == [int(r.replica_id == hung) for r in replicas]
        assert all(r.healthy for r in replicas)
        await shutdown()

    asyncio.run(main())


# ---- monarch: real processes, real signals --------------------------------------------------


@pytest.fixture(scope="module")
def monarch_loop():
    if not HAS_MONARCH:
        pytest.skip("torchmonarch is not installed")
    loop = asyncio.new_event_loop()
    init_provisioner("monarch", stop_timeout_s=2.0)
    yield loop
    loop.run_until_complete(asyncio.wait_for(shutdown(), 60))
    loop.close()


@pytest.mark.monarch
def test_monarch_sigkill_during_fanout_and_sigstop_during_a_call(monarch_loop):
    from forge.controller.monarch import pid_alive

    async def main() -> None:
        svc = await Holder.options(num_replicas=2, timeout_s=3.0).as_service()
        replicas = svc._service.replicas
        pids = {r: pid for r, _, pid in await svc.get.fanout()}
        held, value = random.sample(range(1, 10**6), 2)
        await svc.set.fanout(held)

        # SIGKILL a replica's process while a fanout is in flight on it
        fan = asyncio.ensure_future(svc.set.fanout(value, seconds=1.0))
        await asyncio.sleep(0.3)
        os.kill(pids[0], signal.SIGKILL)
        assert await fan == [1]
        await _wait(lambda: replicas[0].healthy and replicas[0].restarts == 1, "killed replica never replaced")
        states = await svc.get.fanout()  # the replacement is restored to what the dead process held
        assert [(r, v) for r, v, _ in states] == [(0, held), (1, value)] and states[0][2] != pids[0]

        # SIGSTOP: the process is alive but hung; calls to it time out, the probe gets no answer
        stopped = states[1][2]
        os.kill(stopped, signal.SIGSTOP)
        try:
            t0 = time.perf_counter()
            got = await asyncio.gather(*(svc.get.route() for _ in range(2)))
            assert [r for r, _, _ in got] == [0, 0]  # answered by the healthy replica
            assert time.perf_counter() - t0 < 20
            await _wait(lambda: replicas[1].healthy and replicas[1].restarts == 1, "stopped replica never replaced")
            assert not pid_alive(stopped), "a hung replica's process is killed when it is replaced"
            new = await svc.get.fanout()
            assert [(r, v) for r, v, _ in new] == [(0, held), (1, value)] and new[1][2] != stopped
        finally:
            if pid_alive(stopped):
                os.kill(stopped, signal.SIGKILL)
        await svc.shutdown()

    monarch_loop.run_until_complete(asyncio.wait_for(main(), 180))


class Crasher(ForgeActor):
    @endpoint
    async def crash_in_a_thread(self) -> None:
        def crash_here_with_marker() -> None:  # the frame name is what the dumped stack must show
            import threading

            signal.pthread_kill(threading.get_ident(), signal.SIGSEGV)  # this thread faults, as a native bug would

        await asyncio.to_thread(crash_here_with_marker)


@pytest.mark.monarch
def test_monarch_native_crash_prints_the_procs_python_stacks(monarch_loop, capfd):
    """A segfault inside an actor's process (a native bug in torch, gloo or NCCL; one CI run lost its
    TP trainer to one in gloo's thread with nothing but "process exited" to show) prints every thread's
    Python stack to the proc's stderr, which reaches the controller's: where it crashed is on record."""
    from forge.controller.errors import ReplicaDeadError

    async def main() -> None:
        c = await Crasher.options(restart="fail").as_actor()
        with pytest.raises(Exception) as e:
            await c.crash_in_a_thread.call_one()
        assert isinstance(e.value, ReplicaDeadError) or "died" in str(e.value)
        await c.shutdown()

    monarch_loop.run_until_complete(asyncio.wait_for(main(), 120))
    err = capfd.readouterr().err
    assert "Fatal Python error: Segmentation fault" in err and "crash_here_with_marker" in err, err[-2000:]
