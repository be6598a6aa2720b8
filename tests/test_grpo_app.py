"""End-to-end runs of apps/grpo/main.py (CPU, tiny models)."""

import asyncio
import json
from pathlib import Path

import pytest

from apps.grpo.config import load_grpo_config
from apps.grpo.main import main
from forge.config import compose, parse_cli, to_container

APPS = Path(__file__).resolve().parents[1] / "apps" / "grpo"


def config(*argv: str):
    cfg, _ = load_grpo_config(to_container(compose(parse_cli(list(argv)), APPS / "default.yaml")))
    return cfg


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_runs_writes_outputs_and_resumes(tiny_model, tmp_path):
    run = tmp_path / "run"
    common = ["--model", tiny_model, "--output_dir", str(run), "--eval.num_samples", "16", "--eval.every", "0",
              "--samples_every", "2", "--checkpoint_interval", "2", "--advantage.filter_zero_variance", "false",
              "--local_batch_size", "16"]
    out = asyncio.run(main(config(*common, "--steps", "4")))
    assert out["steps"] == 4
    for name in ("metrics.jsonl", "samples.jsonl", "learning_curve.png", "summary.json", "final_hf/config.json"):
        assert (run / name).exists(), name
    rows = metrics(run)
    trained = [r for r in rows if "rl_trainer/avg_loss" in r]
    assert len(trained) == 4
    keys = set().union(*trained)
    for key in ("reward/total/mean", "rollout/response_len/mean", "rollout/clipped_frac", "rl_trainer/grad_norm",
                "rl_trainer/lr", "loss/entropy", "loss/mismatch_kl", "loss/clip_frac_high",
                "buffer/sample/avg_sampled_policy_age", "time/generate_s", "time/train_s", "time/weight_sync_s",
                "generator/generate/sum_tokens_generated"):
        assert key in keys, key
    # resume from the checkpoint of step 4 and train two more steps
    out2 = asyncio.run(main(config(*common, "--steps", "6"), resume=True))
    assert out2["steps"] == 6
    assert len([r for r in metrics(run) if "rl_trainer/avg_loss" in r]) == 6


def test_on_policy_mode_trains_only_fresh_episodes(tiny_model, tmp_path):
    run = tmp_path / "onpolicy"
    out = asyncio.run(main(config("--model", tiny_model, "--output_dir", str(run), "--off_by_n", "0", "--steps", "4",
                                  "--eval.num_samples", "8", "--local_batch_size", "16",
                                  "--advantage.filter_zero_variance", "false")))
    assert out["steps"] == 4
    ages = [r["buffer/sample/max_sampled_policy_age"] for r in metrics(run) if "buffer/sample/max_sampled_policy_age" in r]
    assert ages and max(ages) == 0


@pytest.mark.monarch
def test_monarch_separate_processes_survive_a_killed_reward_replica(tiny_model, tmp_path):
    pytest.importorskip("monarch")
    run = tmp_path / "monarch"
    killed: list[int] = []

    async def kill_reward(step: int, services) -> None:
        if step == 2:
            await services.reward_actor.kill_replica(0)
            killed.append(step)

    cfg = config("--model", tiny_model, "--provisioner", "monarch", "--output_dir", str(run), "--steps", "5",
                 "--eval.num_samples", "8", "--local_batch_size", "16", "--advantage.filter_zero_variance", "false",
                 "--services.reward_actor.num_replicas", "2")
    out = asyncio.run(main(cfg, on_step=kill_reward))
    assert killed == [2] and out["steps"] == 5
    trained = [r for r in metrics(run) if "rl_trainer/avg_loss" in r]
    assert len(trained) == 5
    # weights crossed processes: the generator reports the trainer's versions
    assert max(r.get("rollout/policy_version", 0) for r in trained) >= 3


@pytest.mark.monarch
def test_monarch_fsdp_trainer_broadcasts_to_two_generator_replicas(tiny_model, tmp_path):
    """The multi-GPU layout on CPU processes: trainer FSDP2 over 2 procs (gloo), 2 generator
    replicas, weights by torch.distributed broadcast (push and receive at once), every step."""
    pytest.importorskip("monarch")
    run = tmp_path / "bcast"
    versions: list[list[int]] = []

    async def check_versions(step: int, services) -> None:
        versions.append(await services.policy.get_version.fanout())

    cfg = config("--model", tiny_model, "--provisioner", "monarch", "--output_dir", str(run), "--steps", "4",
                 "--eval.num_samples", "8", "--local_batch_size", "16", "--advantage.filter_zero_variance", "false",
                 "--off_by_n", "0", "--services.policy.num_replicas", "2", "--actors.trainer.procs", "2",
                 "--trainer.weight_sync.transport", "broadcast")
    out = asyncio.run(main(cfg, on_step=check_versions))
    assert out["steps"] == 4
    assert versions == [[s, s] for s in range(1, 5)]  # both replicas hold each step's weights
    trained = [r for r in metrics(run) if "rl_trainer/avg_loss" in r]
    assert len(trained) == 4 and all(r["time/weight_sync_s"] > 0 for r in trained)


@pytest.mark.monarch
def test_monarch_tensor_parallel_generator(tiny_model, tmp_path):
    """The generator at TP=2: one replica of 2 Monarch procs (gloo on CPU), rank 0 schedules and samples,
    rank 1 runs its shard; each rank loads its own shard of the trainer's published weights (shm)."""
    pytest.importorskip("monarch")
    run = tmp_path / "tp"
    versions: list = []

    async def check_versions(step: int, services) -> None:
        versions.append(await services.policy.get_version.fanout())

    cfg = config("--model", tiny_model, "--provisioner", "monarch", "--output_dir", str(run), "--steps", "2",
                 "--eval.num_samples", "4", "--local_batch_size", "8", "--advantage.filter_zero_variance", "false",
                 "--off_by_n", "0", "--services.policy.procs", "2", "--policy.engine_args.tensor_parallel_size", "2")
    out = asyncio.run(main(cfg, on_step=check_versions))
    assert out["steps"] == 2
    assert versions == [[1], [2]]
    rows = metrics(run)
    trained = [r for r in rows if "rl_trainer/avg_loss" in r]
    assert len(trained) == 2 and all(r["generator/generate/sum_tokens_generated"] > 0 for r in trained)


def flaky_math(prompt, response, target):
    """The math reward, except that its backend "fails" on about one response in ten."""
    import zlib

    from forge.data.rewards import MathReward

    if zlib.crc32(response.encode()) % 10 == 0:
        raise RuntimeError("reward backend unreachable")
    return MathReward()(prompt, response, target)


def broken_reward(prompt, response, target):
    raise RuntimeError("reward backend unreachable: connection refused")


def test_reward_infra_errors_are_dropped_counted_and_reported(tiny_model, tmp_path):
    """Issue 21: a reward that raises is never a 0.0 score: those episodes are not trained on, the
    run counts them (reward/infra_errors, rollout/infra_error_episodes) and goes on under the limit."""
    run = tmp_path / "flaky"
    out = asyncio.run(main(config(
        "--model", tiny_model, "--output_dir", str(run), "--steps", "3", "--eval.num_samples", "4",
        "--local_batch_size", "16", "--advantage.filter_zero_variance", "false",
        "--rewards", f'[{{"_target_": "{__name__}:flaky_math", "log_name": "math"}}]',
        "--reward.isolation", "thread")))
    assert out["steps"] == 3
    rows = metrics(run)
    assert sum(r.get("reward/infra_errors", 0) for r in rows) > 0
    assert sum(r.get("rollout/infra_error_episodes", 0) for r in rows) > 0
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()] \
        if (run / "samples.jsonl").exists() else []
    assert all(s["reward"] == s["reward"] for s in samples)  # no NaN (failed) episode was trained on


def test_a_run_whose_rewards_all_fail_stops_with_the_cause(tiny_model, tmp_path):
    from forge.controller import shutdown
    from forge.errors import InfraError

    async def run_it():
        try:
            await main(config(
                "--model", tiny_model, "--output_dir", str(tmp_path / "broken"), "--steps", "3",
                "--eval.num_samples", "4", "--local_batch_size", "16",
                "--rewards", f'[{{"_target_": "{__name__}:broken_reward"}}]', "--reward.isolation", "thread"))
        finally:
            await shutdown()

    with pytest.raises(InfraError, match="connection refused") as exc:
        asyncio.run(run_it())
    assert "max_infra_error_fraction" in str(exc.value)
