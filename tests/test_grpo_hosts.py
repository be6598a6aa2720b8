"""The GRPO app on several hosts (issue 23): Monarch's ProcessJob with 3 local worker hosts
(generator on one, trainer FSDP over 2 procs on another, reward + reference on the third),
attached `forge worker` hosts on loopback TCP, a killed host, and the SLURM launch script."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from pathlib import Path

import pytest

from apps.grpo.config import provisioner_options
from forge.config import ConfigError
from tests.grpo_learning import EVAL_ARGS, LEARN_STEPS, assert_learned
from tests.test_grpo_app import APPS, config, metrics

pytest.importorskip("monarch")

FIX = Path(__file__).resolve().parent / "fixtures" / "hosts"
THREE_HOSTS = ["--provisioner", "{kind: monarch, job: process, meshes: {gen: 1, train: 1, rr: 1}}",
               "--services.policy.mesh_name", "gen", "--actors.trainer.mesh_name", "train",
               "--actors.trainer.procs", "2", "--services.ref_model.mesh_name", "rr",
               "--services.reward_actor.mesh_name", "rr", "--loss", "{name: grpo, beta: 0.02}"]
# the light stateful actors next to the trainer (they hold the data position and the buffer)
PINNED = ["--actors.replay_buffer.mesh_name", "train", "--actors.dataset.mesh_name", "train",
          "--actors.compute_advantages.mesh_name", "train"]
FAST = ["--eval.num_samples", "8", "--eval.every", "0", "--local_batch_size", "16",
        "--advantage.filter_zero_variance", "false"]


def host_of(handle, replica: int = 0) -> list[int]:
    return [h.index for h in handle._service.replicas[replica].hosts]


class VersionProbe:
    """After each step: every generator replica's weight version and the hosts each service runs on."""

    def __init__(self) -> None:
        self.versions: list[list[int]] = []
        self.hosts: dict[str, list[int]] = {}

    async def __call__(self, step: int, s) -> None:
        self.versions.append(await s.policy.get_version.fanout())
        self.hosts = {"policy": host_of(s.policy), "trainer": host_of(s.trainer), "ref_model": host_of(s.ref_model),
                      "reward_actor": host_of(s.reward_actor)}


@pytest.mark.slow  # ~50 s on the loaded 2-core box: worker hosts, procs, 4 GRPO steps
@pytest.mark.monarch
def test_three_hosts_generator_trainer_and_reward_ref_apart(tiny_model, tmp_path):
    run = tmp_path / "three"
    probe = VersionProbe()
    cfg = config("--model", tiny_model, "--output_dir", str(run), "--steps", "4", "--off_by_n", "0",
                 *THREE_HOSTS, *FAST)
    assert provisioner_options(cfg)[1]["job"] == "process"
    out = asyncio.run(main_run(cfg, probe))
    assert out["steps"] == 4
    assert probe.versions == [[s] for s in range(1, 5)]  # the generator's host gets every version
    h = probe.hosts
    assert h["ref_model"] == h["reward_actor"] and len({h["policy"][0], h["trainer"][0], h["ref_model"][0]}) == 3
    trained = [r for r in metrics(run) if "rl_trainer/avg_loss" in r]
    assert len(trained) == 4 and all(r["time/weight_sync_s"] > 0 for r in trained)


@pytest.mark.slow
@pytest.mark.monarch
@pytest.mark.timeout(2400)  # the first learning test of a session also pays the shared SFT warm-up (24 min loaded)
def test_three_hosts_learn_like_one_process(tmp_path_factory, warmup_cache):
    """The embedded default (SFT warm-up, then GRPO on held-out arithmetic) on the 3-host layout
    learns as the one-process run does (tests/grpo_learning.py's bars, shared with the TP and LoRA
    tests; docs/perf/NOTES_hosts.md has the curves of both layouts)."""
    run = tmp_path_factory.mktemp("learn") / "run"
    probe = VersionProbe()
    cfg = config("--warmup.cache_dir", str(warmup_cache), "--output_dir", str(run), "--steps", str(LEARN_STEPS),
                 "--trainer.optimizer.lr", "3e-4", *EVAL_ARGS, "--off_by_n", "1", "--metric_logging", "{jsonl: {}}",
                 *THREE_HOSTS, *PINNED)
    out = asyncio.run(main_run(cfg, probe))
    assert_learned(out, metrics(run), "on 3 hosts")
    assert probe.versions[-1][0] >= LEARN_STEPS - 1  # the generator's host kept receiving versions


async def main_run(cfg, on_step=None):
    from apps.grpo.main import main

    return await main(cfg, on_step=on_step)


@pytest.mark.slow  # ~50 s on the loaded 2-core box: worker hosts, procs, 4 GRPO steps
@pytest.mark.monarch
def test_killed_host_replica_restarts_on_a_live_host_no_episode_lost(tiny_model, tmp_path):
    """SIGKILL the worker process of the host the reward actor runs on, mid-run: the reward replica
    is restarted on the other live host of its group, no episode is lost, the run finishes."""
    from forge.controller import get_provisioner

    run = tmp_path / "kill"
    seen: dict = {}

    async def kill_host(step: int, s) -> None:
        if step != 2:
            return
        pool = get_provisioner().pool
        victim = pool.hosts[host_of(s.reward_actor)[0]]
        seen["victim"] = victim.index
        os.kill(victim.pid, signal.SIGKILL)
        t0 = time.perf_counter()
        svc = s.reward_actor._service
        deadline = t0 + 120
        while not (svc.replicas[0].healthy and svc.replicas[0].restarts >= 1 and not svc._restarting):
            assert time.perf_counter() < deadline, "the reward replica never came back"
            await asyncio.sleep(0.05)
        seen["recovery_s"] = time.perf_counter() - t0
        seen["new_host"] = host_of(s.reward_actor)[0]

    cfg = config("--model", tiny_model, "--output_dir", str(run), "--steps", "4",
                 "--provisioner", "{kind: monarch, job: process, meshes: {gen: 1, train: 1, rr: 2}}",
                 "--services.policy.mesh_name", "gen", "--actors.trainer.mesh_name", "train",
                 "--services.reward_actor.mesh_name", "rr", "--services.reward_actor.max_retries", "4",
                 *PINNED, *FAST)  # the stateful actors (restart policy 'fail') off the host that dies
    out = asyncio.run(main_run(cfg, kill_host))
    assert out["steps"] == 4 and seen["new_host"] != seen["victim"]
    trained = [r for r in metrics(run) if "rl_trainer/avg_loss" in r]
    assert len(trained) == 4
    rows = metrics(run)
    lost = sum(r.get("rollout/infra_error_episodes", 0) for r in rows)  # episodes the dead host cost
    assert lost == 0
    print(f"host kill: recovery {seen['recovery_s']:.1f}s, episodes lost {lost}")


@pytest.mark.slow  # ~50 s on the loaded 2-core box: worker hosts, procs, 4 GRPO steps
@pytest.mark.monarch
def test_attached_loopback_workers_run_the_same_layout(tiny_model, tmp_path):
    """`job: attach`: two `forge worker` processes the test starts on loopback TCP ports."""
    from forge.controller.placement import free_port
    from tests.test_controller_hosts import _start_worker, _stop, _wait_listening

    ports = [free_port(), free_port()]
    workers = [_start_worker(p) for p in ports]
    try:
        _wait_listening(ports)
        run = tmp_path / "attach"
        probe = VersionProbe()
        workers_arg = ", ".join(f"tcp://127.0.0.1:{p}" for p in ports)
        cfg = config("--model", tiny_model, "--output_dir", str(run), "--steps", "4", "--off_by_n", "0",
                     "--provisioner", f"{{kind: monarch, job: attach, workers: [{workers_arg}]}}",
                     "--actors.trainer.procs", "2", "--loss", "{name: grpo, beta: 0.02}", *FAST)
        out = asyncio.run(main_run(cfg, probe))
        assert out["steps"] == 4 and probe.versions == [[s] for s in range(1, 5)]
        assert {i for hosts in probe.hosts.values() for i in hosts} == {0, 1}  # both workers hold services
        assert all(w.poll() is None for w in workers)  # the user's workers outlive the run
    finally:
        _stop(workers)


def _normalise(script: str) -> str:
    script = re.sub(r"forge_\d+", "forge_PID", script)
    script = re.sub(r"MONARCH_SERVICE_PROC_IDS=.*", "MONARCH_SERVICE_PROC_IDS=IDS", script)
    return re.sub(r"--config \S+forge_forge\.yaml", "--config CONFIG", script)


def test_forge_launch_slurm_dry_run_matches_the_golden_script(capsys):
    from apps.cli import main as forge

    argv = ["launch", "slurm", "--nodes", "2", "--dry-run", "--config", str(APPS / "default.yaml"),
            "--config", str(FIX / "slurm_2node.yaml")]
    assert forge(argv) == 0
    script = capsys.readouterr().out
    assert _normalise(script) == (FIX / "sbatch_2node.golden").read_text()
    assert "MONARCH_SERVICE_PROC_IDS='[" in script  # SlurmJob's per-node identities are in it


def test_hosts_config_refuses_what_the_job_cannot_hold():
    with pytest.raises(ConfigError, match=r"'actors.trainer.hosts: 3' \(hosts per replica\) does not fit.*'train': 1"):
        config(*THREE_HOSTS, "--actors.trainer.hosts", "3")
    with pytest.raises(ConfigError, match=r"'services.policy.mesh_name: nope'.*\['gen', 'rr', 'train'\]"):
        config(*THREE_HOSTS, "--services.policy.mesh_name", "nope")
    with pytest.raises(ConfigError, match=r"'actors.trainer.hosts: 2' needs several hosts: set provisioner.job"):
        config("--provisioner", "monarch", "--actors.trainer.hosts_per_replica", "2")
    with pytest.raises(ConfigError, match="provisioner.job must be one of"):
        config("--provisioner", "{kind: monarch, job: mpi, hosts: 2}")
    with pytest.raises(ConfigError, match="hosts: 2' and 'actors.trainer.hosts_per_replica: 1' disagree"):
        config("--provisioner", "monarch", "--actors.trainer.hosts", "2", "--actors.trainer.hosts_per_replica", "1")
    cfg = config("--provisioner", "{kind: monarch, job: process, hosts: 2}", "--actors.trainer.hosts_per_replica", "2")
    assert cfg.actors.trainer.hosts == 2
    with pytest.raises(ValueError, match="trainer.weight_sync.addr: with provisioner.job 'slurm'"):
        from apps.grpo.support import weight_sync_config

        weight_sync_config(config("--provisioner", "{kind: monarch, job: slurm, hosts: 2}"))
