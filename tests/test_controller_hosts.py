"""The monarch backend on several hosts: Monarch's ProcessJob (each host a local worker process)
and attached workers (`forge worker`, loopback TCP only). Real processes, gloo on CPU."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("monarch.actor")

from forge.controller import (
    ForgeActor,
    ResourceError,
    endpoint,
    get_provisioner,
    init_provisioner,
    shutdown,
)
from forge.controller.hosts import JobConfig, sbatch_script, worker_command
from forge.controller.placement import free_port, pid_alive


class Ranks(ForgeActor):
    def __init__(self, scale: float = 1.0):
        self.scale = scale

    @endpoint
    async def allreduce(self, values: list[float]) -> dict:
        """Each rank contributes its own value; the group's sum comes back with the rank's env."""
        import torch.distributed as dist

        from forge.distributed import init_distributed

        init_distributed(torch.device("cpu"), self.world_size, self.rank)
        t = torch.tensor([values[self.rank] * self.scale], dtype=torch.float64)
        if self.world_size > 1:
            dist.all_reduce(t)
        env = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                          "MASTER_PORT", "FORGE_HOST_INDEX")}
        return {"sum": t.item(), "pid": os.getpid(), "host_pid": os.getppid(), **env}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 240))


def test_replica_spans_two_hosts_and_its_process_group_works():
    """hosts=2 x procs=2: 4 ranks on two worker hosts, one gloo group, env per proc."""

    async def go():
        init_provisioner("monarch", job="process", hosts=3)
        try:
            actor = await Ranks.options(procs=2, hosts_per_replica=2).as_actor(scale=2.0)
            values = [random.uniform(-5, 5) for _ in range(4)]
            out = await actor.allreduce.call(values)
            pool = get_provisioner().pool
            return values, out, {h.pid: h.index for h in pool.hosts}
        finally:
            await shutdown()

    values, out, host_of_pid = run(go())
    assert [o["RANK"] for o in out] == ["0", "1", "2", "3"]
    assert {o["WORLD_SIZE"] for o in out} == {"4"} and {o["LOCAL_WORLD_SIZE"] for o in out} == {"2"}
    assert [o["LOCAL_RANK"] for o in out] == ["0", "1", "0", "1"]
    for o in out:
        assert o["sum"] == pytest.approx(2.0 * sum(values))
        assert host_of_pid[o["host_pid"]] == int(o["FORGE_HOST_INDEX"])  # spawned by that host's worker
        assert o["MASTER_ADDR"] == "127.0.0.1" and o["MASTER_PORT"] == out[0]["MASTER_PORT"]
    assert out[0]["FORGE_HOST_INDEX"] == out[1]["FORGE_HOST_INDEX"] != out[2]["FORGE_HOST_INDEX"]


def test_placement_that_does_not_fit_fails_at_start_with_what_exists():
    async def go():
        init_provisioner("monarch", job="process", meshes={"gen": 1, "train": 2})
        try:
            with pytest.raises(ResourceError, match=r"asks for 3 host\(s\) per replica.*at most 2"):
                await Ranks.options(hosts=3).as_actor()
            with pytest.raises(ResourceError, match=r"host mesh 'nope'.*groups: \['gen', 'train'\]"):
                await Ranks.options(mesh_name="nope").as_actor()
        finally:
            await shutdown()
        init_provisioner("monarch")
        try:
            with pytest.raises(ResourceError, match="asks for 2 hosts per replica.*no job"):
                await Ranks.options(hosts=2).as_actor()
        finally:
            await shutdown()

    run(go())


def test_job_config_refuses_what_it_cannot_run():
    with pytest.raises(ValueError, match="provisioner.job must be one of"):
        JobConfig(job="mpi", hosts=2).validate()
    with pytest.raises(ValueError, match="job 'attach' needs the worker addresses"):
        JobConfig(job="attach").validate()
    with pytest.raises(ValueError, match="not a worker address"):
        JobConfig(job="attach", workers=["127.0.0.1:4000"]).validate()
    with pytest.raises(ValueError, match="need a job"):
        JobConfig(hosts=3).validate()
    with pytest.raises(ValueError, match="disagrees with provisioner.meshes"):
        JobConfig(job="process", hosts=2, meshes={"a": 2, "b": 1}).validate()


def test_killed_host_worker_is_a_dead_replica_restarted_on_a_live_host():
    """SIGKILL the worker process of the host a replica runs on: the next call is retried on the
    replica restarted on another (live) host; the answer is still right."""

    async def go():
        init_provisioner("monarch", job="process", hosts=2)
        try:
            svc = await Ranks.options(procs=1, num_replicas=1, max_retries=3).as_service(scale=3.0)
            first = (await svc.allreduce.route([1.5]))
            pool = get_provisioner().pool
            victim = next(h for h in pool.hosts if h.pid == first["host_pid"])
            os.kill(victim.pid, signal.SIGKILL)
            t0 = time.perf_counter()
            value = random.uniform(1, 9)
            second = await svc.allreduce.route([value])
            recovery = time.perf_counter() - t0
            return first, second, victim, recovery
        finally:
            await shutdown()

    first, second, victim, recovery = run(go())
    assert second["sum"] != first["sum"] and second["host_pid"] != victim.pid
    assert int(second["FORGE_HOST_INDEX"]) != victim.index
    assert not pid_alive(first["pid"])  # the dead host's proc went with it
    print(f"host-kill recovery: {recovery:.1f}s")


def _start_worker(port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "apps.cli", "worker", "--address", f"tcp://127.0.0.1:{port}"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.path.join(root, "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(cmd, env=env, cwd=root, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _wait_listening(ports: list[int], timeout: float = 60.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    for port in ports:
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, f"worker on port {port} never listened"
            time.sleep(0.2)


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(10)


def test_attach_to_workers_started_by_forge_worker_on_loopback():
    ports = [free_port(), free_port()]
    workers = [_start_worker(p) for p in ports]
    try:
        _wait_listening(ports)
        async def go():
            init_provisioner("monarch", job="attach", workers=[f"tcp://127.0.0.1:{p}" for p in ports])
            try:
                actor = await Ranks.options(procs=1, hosts=2).as_actor()
                values = [random.uniform(-3, 3) for _ in range(2)]
                return values, await actor.allreduce.call(values), [h.pid for h in get_provisioner().pool.hosts]
            finally:
                await shutdown()

        values, out, host_pids = run(go())
        assert [o["sum"] for o in out] == [pytest.approx(sum(values))] * 2
        assert host_pids == [w.pid for w in workers]  # each worker found by its listening port
        assert [o["host_pid"] for o in out] == [w.pid for w in workers]
        assert all(w.poll() is None for w in workers)  # the user's workers outlive the run
    finally:
        _stop(workers)


def test_worker_command_is_monarchs_worker_loop():
    cmd = worker_command("tcp://127.0.0.1:4567", python_exe="py")
    assert cmd[0] == "py" and "run_worker_loop_forever(address='tcp://127.0.0.1:4567'" in cmd[2]


def test_sbatch_script_written_by_slurmjob(tmp_path):
    cfg = JobConfig(job="slurm", hosts=2, partition="gpu", account="rl", time="01:00:00", gpus_per_node=8,
                    slurm_args=["--constraint=h100"], log_dir="/logs")
    script = sbatch_script(cfg, str(tmp_path))
    for line in ("#SBATCH --nodes=2", "#SBATCH --partition=gpu", "#SBATCH --account=rl", "#SBATCH --time=01:00:00",
                 "#SBATCH --gpus-per-node=8", "#SBATCH --constraint=h100", "srun python -c"):
        assert line in script
