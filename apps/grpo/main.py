"""GRPO: sample a prompt, generate a group of answers, score them, compute group-relative
advantages, train, push the new weights to the generator. Rollouts and training are two
concurrent loops sharing a replay buffer; `off_by_n` (max policy age) 0 makes it on-policy,
>= 1 lets generation run ahead of training.

    python -m apps.grpo.main                                   # embedded default: tiny model, CPU
    python -m apps.grpo.main --config apps/grpo/qwen3_1_7b.yaml --model /models/Qwen3-1.7B
    python -m apps.grpo.main --resume                          # continue the last run in output_dir
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import torch

from apps.grpo.agentic import rollout_env_group
from apps.grpo.config import GRPOConfig, load_grpo_config, provisioner_options, rollout_ahead
from apps.grpo.config import groups_per_step as groups_per_step_of
from apps.grpo.supervision import RolloutSupervisor, wait_for_batch
from apps.grpo.support import (
    InfraErrors,
    RolloutBudget,
    build_services,
    evaluate,
    resolve_model,
    sync_weights,
    weight_sync_config,
    write_learning_curve,
)

# torchforge's apps/grpo/main.py defines these; code importing them from here gets forge's (forge.compat)
from forge.compat import ComputeAdvantages, DatasetActor, RewardActor, collate, simple_grpo_loss  # noqa: E402,F401,I001
from forge.config import compose, parse_cli, run_cli, to_container
from forge.config.help import format_help, wants_help, without_help
from forge.controller import ReplicaLostError, init_provisioner, shutdown
from forge.data.collate import collate_episodes
from forge.data.datasets import DatasetConfig
from forge.engine.config import EngineConfig, SamplingParams
from forge.observability import MetricLogger, Reduce, build_backends, drain, record_metric, truncate_jsonl
from forge.trainer.checkpoint import latest_checkpoint
from forge.types import (
    Episode,
    Group,  # noqa: F401
)
from forge.weight_sync import cleanup_run

log = logging.getLogger("forge.grpo")
DEFAULT_CONFIG = Path(__file__).with_name("default.yaml")
# dict-typed blocks and the dataclasses that validate them (validate_sections), listed in --help
HELP_SECTIONS = {"dataset": DatasetConfig, "policy.engine_args": EngineConfig,
                 "policy.sampling_params": SamplingParams}


async def main(cfg: GRPOConfig, resume: bool = False,
               on_step: Callable[[int, Any], Awaitable[None]] | None = None) -> dict:
    """Run GRPO. `on_step(step, services)` (optional) runs after each training step: a hook for
    tests and experiments (fault injection, custom evaluation)."""
    sync = weight_sync_config(cfg)  # a bad transport/placement fails here, before any warm-up
    try:
        return await _train(cfg, sync, resume, on_step)
    except ReplicaLostError as e:  # a stateful service (the trainer) died: the run cannot go on
        raise ReplicaLostError(f"{e}. The run stops: {resume_hint(Path(cfg.output_dir))}") from e
    finally:
        await shutdown()  # every service's teardown, after a crash too (the publisher removes its files)
        cleanup_run(sync)  # and what a killed trainer process left in /dev/shm


def resume_hint(run_dir: Path) -> str:
    last = latest_checkpoint(run_dir / "checkpoints")
    if last is None:
        return f"no checkpoint was saved in {run_dir / 'checkpoints'} (checkpoint_interval sets how often)"
    return f"the last checkpoint is {last}; rerun with --resume to continue from it"


async def _train(cfg: GRPOConfig, sync: dict[str, Any], resume: bool,
                 on_step: Callable[[int, Any], Awaitable[None]] | None) -> dict:
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    kind, opts = provisioner_options(cfg)  # {kind: monarch, share_gpus: true, job: process, hosts: 3, ...}
    init_provisioner(kind, **opts)
    model_path = await asyncio.to_thread(resolve_model, cfg)  # may run the SFT warm-up (first time)
    max_steps = cfg.steps or 100
    logger = MetricLogger(build_backends(cfg.metric_logging, total_steps=max_steps, run_dir=run_dir))
    drain()  # records left in this process by earlier work (another run, a test) are not this run's
    s = await build_services(cfg, model_path, run_dir, sync)  # dataloader, policy, trainer, buffer, ...
    group_size = cfg.group_size
    groups_per_step = groups_per_step_of(cfg)

    step = 0
    restored_groups = 0
    # samples drawn from the dataset whose group is not in the replay buffer yet: a checkpoint saves
    # them (they are past its data position and not in its buffer), a resume generates them first
    flight = InFlight()
    if resume:  # the trainer restores model/optimizer/RNG; we restore the data position, buffer and step
        step, restored_groups, flight.pending = await restore_run_state(s, run_dir, logger)

    before = await evaluate(cfg, s, step)
    print(f"held-out accuracy before training: {before['eval/accuracy']:.3f}")
    await logger.flush(step, extra=before)

    # the app saves (with the data position); torchforge configs put the interval under trainer
    checkpoint_interval = cfg.checkpoint_interval or cfg.trainer.checkpoint.interval
    budget = RolloutBudget(groups_per_step, ahead=rollout_ahead(cfg))
    budget.available = max(0, budget.available - restored_groups)  # run-ahead groups the checkpoint kept
    infra = InfraErrors(groups_per_step * group_size, cfg.reward.max_infra_error_fraction)
    stop = asyncio.Event()
    recent: list[list[Episode]] = []
    sup = RolloutSupervisor(cfg.advantage.max_consecutive_filtered, cfg.batch_timeout_s)

    # ---------------------------------------------------------------- the two loops
    async def continuous_rollouts() -> None:
        while not stop.is_set():
            if not await budget.acquire(stop):
                return
            async with flight.lock:  # a checkpoint's data position and in-flight list agree
                sample = flight.pending.pop(0) if flight.pending else await s.dataloader.sample.call_one()
                token = flight.add(sample)
            if sample is None:
                budget.refund()
                return
            if cfg.env is not None:  # agentic: multi-turn episodes in an environment (apps/grpo/agentic.py)
                t0 = time.perf_counter()
                group = await rollout_env_group(cfg, s, sample, group_size)
                t1 = t2 = time.perf_counter()
                if not group:  # the task's prompt is over max_req_tokens: draw another
                    flight.done(token)
                    budget.refund()
                    continue
            else:
                prompt, target = sample["request"], sample["target"]
                t0 = time.perf_counter()
                completions = await s.policy.generate.route(prompt, n=group_size, **sample_seed(cfg, sample))
                t1 = time.perf_counter()
                scores = await s.reward_actor.evaluate.route(
                    [prompt] * group_size, [c.text for c in completions], [target] * group_size)
                t2 = time.perf_counter()
                group_id = sample.get("sample_id") or f"{step}-{completions[0].metadata.get('request_id')}-{t0}"
                group = [
                    Episode(request=prompt, policy_version=c.generator_version, pad_id=s.pad_id,
                            request_len=len(c.prompt_ids), response_len=len(c.token_ids), target=target,
                            completion=c, reward=sc["total"], reward_breakdown=sc["breakdown"],
                            metadata={"group_id": group_id,
                                      **({"infra_error": sc["infra_error"]} if sc.get("failed") else {})})
                    for c, sc in zip(completions, scores)
                ]
            if not infra.keep(group):  # a reward failed: never trained on; too many failures stop the run
                flight.done(token)
                budget.refund()
                continue
            advantages = await s.compute_advantages.compute.call_one(group)
            for ep, adv in zip(group, advantages):
                ep.advantage = adv
            why = filtered_reward_reason(group) if cfg.advantage.filter_zero_variance else None
            if why is not None:
                record_metric("rollout/filtered_zero_variance_groups", 1, Reduce.SUM)
                flight.done(token)
                budget.refund()  # DAPO dynamic sampling: this group teaches nothing; draw another
                sup.group_filtered(why)  # raises at the bound: constant rewards never train
                continue
            t3 = time.perf_counter()
            if s.ref_model is not None:
                inputs, targets = collate_episodes(group)
                ref = await s.ref_model.forward.route(inputs, targets)
                for i, ep in enumerate(group):
                    ep.ref_logprobs = ref[i, : ep.response_len]
            t4 = time.perf_counter()
            async with flight.lock:  # in the buffer xor in flight, for a checkpoint
                await s.replay_buffer.add_group.call_one(group)
                flight.done(token)
            sup.group_added()
            record_rollout_metrics(group, s.correct_key, t1 - t0, t2 - t1, t4 - t3)
            recent.append(group)
            del recent[:-4]

    async def continuous_training() -> None:
        nonlocal step
        while step < max_steps:
            t0 = time.perf_counter()
            # bounded: raises if the rollouts died (too many reward/sandbox failures among them) or
            # filter everything, or the buffer was lost
            batch = await wait_for_batch(sup, lambda step=step: s.replay_buffer.sample.call_one(curr_policy_version=step))
            if batch is None:
                log.warning("the rollouts finished (dataset exhausted) after %d of %d steps", step, max_steps)
                break
            t1 = time.perf_counter()
            inputs, targets = batch
            await s.trainer.train_step.call(inputs, targets)
            step += 1
            t2 = time.perf_counter()
            if step % cfg.sync_interval == 0:
                await sync_weights(s, step)
            t3 = time.perf_counter()
            budget.release_step()  # rollouts may now generate for the next step
            record_metric("time/wait_for_batch_s", t1 - t0, Reduce.MEAN)
            record_metric("time/train_s", t2 - t1, Reduce.MEAN)
            record_metric("time/weight_sync_s", t3 - t2, Reduce.MEAN)
            record_metric("time/step_s", t3 - t0, Reduce.MEAN)
            n_tok = int(targets[0]["padding_mask"].sum())
            record_metric("rl_trainer/tokens_per_s", n_tok / max(t2 - t1, 1e-9), Reduce.MEAN)
            extra = {}
            if cfg.eval.every and step % cfg.eval.every == 0 and step < max_steps:
                extra = await evaluate(cfg, s, step)
            await logger.flush(step, extra=extra)
            if cfg.samples_every and step % cfg.samples_every == 0:
                write_samples(run_dir / "samples.jsonl", step, recent)
            if checkpoint_interval and step % checkpoint_interval == 0:
                await save_checkpoint(s, step, flight)
            if on_step is not None:
                await on_step(step, s)
        stop.set()

    t_start = time.perf_counter()
    rollouts = [asyncio.create_task(continuous_rollouts()) for _ in range(max(1, cfg.rollout_threads))]
    sup.tasks = rollouts
    try:
        await continuous_training()
    finally:
        stop.set()
        budget.wake()
        for t in rollouts:
            t.cancel()
        await asyncio.gather(*rollouts, return_exceptions=True)
    train_time = time.perf_counter() - t_start

    await save_checkpoint(s, step, flight)
    after = await evaluate(cfg, s, step)
    await logger.flush(step + 1, extra=after)
    logger.close()
    await s.trainer.export_hf.call(str(run_dir / "final_hf"))  # with LoRA: the adapters merged in
    if cfg.lora is not None:
        await s.trainer.save_adapter.call(str(run_dir / "final_adapter"))  # HF peft format
    curve = write_learning_curve(logger.history, run_dir / "learning_curve.png")
    summary = {
        "accuracy_before": before["eval/accuracy"],
        "accuracy_after": after["eval/accuracy"],
        "steps": step,
        "train_seconds": train_time,
        "run_dir": str(run_dir),
        "learning_curve": str(curve) if curve else None,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"held-out accuracy: {summary['accuracy_before']:.3f} -> {summary['accuracy_after']:.3f} "
          f"after {step} steps in {train_time:.0f}s; outputs in {run_dir}")
    if s.weight_transport == "cuda_ipc":  # generators map the trainer's GPU memory: release it before the trainer exits
        await s.policy.shutdown()
    await shutdown()
    return summary


def filtered_reward_reason(group: list[Episode]) -> str | None:
    """Why DAPO's dynamic sampling drops this group (no reward variance: it teaches nothing), or None."""
    rewards = [ep.reward for ep in group]
    bad = [r for r in rewards if r is None or not math.isfinite(r)]
    if bad:  # NaN != NaN: a set of NaN rewards would look varied
        return f"non-finite rewards {bad[:3]}"
    if len(set(rewards)) == 1:
        return f"all {len(rewards)} rewards = {rewards[0]:g}"
    return None


def record_rollout_metrics(group: list[Episode], correct_key: str | None, t_gen: float, t_reward: float, t_ref: float) -> None:
    for ep in group:
        c = ep.completion
        assert c is not None
        record_metric("rollout/response_len/mean", len(c.token_ids), Reduce.MEAN)
        record_metric("rollout/response_len/max", len(c.token_ids), Reduce.MAX)
        record_metric("rollout/clipped_frac", float(c.stop_reason == "length"), Reduce.MEAN)
        record_metric("rollout/policy_version", ep.policy_version, Reduce.MAX)
        record_metric("advantage/mean", float(ep.advantage or 0.0), Reduce.MEAN)
        record_metric("advantage/std", float(ep.advantage or 0.0), Reduce.STD)
        if correct_key is not None:
            correct = float(ep.reward_breakdown.get(correct_key, 0.0) >= 1.0 - 1e-6)
            record_metric("rollout/accuracy", correct, Reduce.MEAN)
    record_metric("time/generate_s", t_gen, Reduce.MEAN)
    record_metric("time/reward_s", t_reward, Reduce.MEAN)
    record_metric("time/ref_s", t_ref, Reduce.MEAN)


def sample_seed(cfg: GRPOConfig, sample: dict[str, Any]) -> dict[str, Any]:
    """The group's sampling seed, from the run's seed and the sample's place in the data order, so
    that its completions do not depend on which rollout task asked first (the engine's default
    seeds follow request order). A seed set in policy.sampling_params is the user's and stays."""
    if "seed" in cfg.policy.sampling_params or "sample_id" not in sample:
        return {}
    digest = hashlib.blake2b(f"{cfg.seed}/{sample['sample_id']}".encode(), digest_size=8).digest()
    return {"sampling": {"seed": int.from_bytes(digest, "little") >> 1}}


def write_samples(path: Path, step: int, groups: list[list[Episode]]) -> None:
    with open(path, "a") as f:
        for group in groups[-2:]:
            for ep in group[:4]:
                f.write(json.dumps({
                    "step": step, "prompt": ep.request, "response": ep.completion.text if ep.completion else "",
                    "target": str(ep.target), "reward": ep.reward, "breakdown": ep.reward_breakdown,
                    "advantage": ep.advantage, "policy_version": ep.policy_version,
                    "stop_reason": ep.completion.stop_reason if ep.completion else None,
                }) + "\n")


class InFlight:
    """Samples drawn from the dataset whose group has not reached the replay buffer (in draw
    order), and the lock under which rollouts draw / add and a checkpoint reads both states."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.samples: dict[int, dict[str, Any]] = {}
        self.pending: list[dict[str, Any]] = []  # restored by --resume: generated before new draws
        self._n = 0

    def add(self, sample: dict[str, Any] | None) -> int:
        self._n += 1
        if sample is not None:
            self.samples[self._n] = sample
        return self._n

    def done(self, token: int) -> None:
        self.samples.pop(token, None)


async def save_checkpoint(s, step: int, flight: InFlight | None = None) -> None:
    flight = flight or InFlight()
    async with flight.lock:  # no draw or add in between: each sample is in exactly one of the three
        data_state = await s.dataloader.state_dict.call_one()
        buffer_state = await s.replay_buffer.state_dict.call_one()  # run-ahead episodes survive a resume
        in_flight = list(flight.samples.values()) + list(flight.pending)
    await s.trainer.save.call(step, extra={"step": step, "dataset": data_state, "replay_buffer": buffer_state,
                                           "in_flight": in_flight})


async def restore_run_state(s, run_dir: Path, logger: MetricLogger) -> tuple[int, int, list[dict[str, Any]]]:
    """--resume: the newest checkpoint's step, data position and replay buffer; the rows logged
    for later steps (redone now) are dropped. Returns (step, complete groups restored, the samples
    that were in flight: drawn, their group not yet in the buffer)."""
    loaded = (await s.trainer.load.call())[0]
    if loaded is None:
        log.warning("--resume: no checkpoint in %s; starting from scratch", run_dir / "checkpoints")
        logger.rewind(-1)
        truncate_jsonl(run_dir / "samples.jsonl", -1)
        return 0, 0, []
    extra = loaded["extra"]
    step = int(extra["step"])
    await s.dataloader.load_state_dict.call_one(extra["dataset"])
    groups = 0
    if "replay_buffer" in extra:  # checkpoints written before the buffer was saved have none
        await s.replay_buffer.load_state_dict.call_one(extra["replay_buffer"])
        groups = len(extra["replay_buffer"]["groups"])
    logger.rewind(step)
    truncate_jsonl(run_dir / "samples.jsonl", step)
    await sync_weights(s, step)
    print(f"resumed at step {step}" + (f" with {groups} buffered groups" if groups else ""))
    return step, groups, list(extra.get("in_flight", []))


def cli(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_cli(_cli, sys.argv[1:] if argv is None else argv)  # a config error: its message, exit 2


def _cli(argv: list[str]) -> dict:
    parsed = parse_cli(without_help(argv), flags=("resume",))
    cfg, report = load_grpo_config(to_container(compose(parsed, DEFAULT_CONFIG)))
    if wants_help(argv):
        print(format_help("forge grpo", __doc__, GRPOConfig, cfg, DEFAULT_CONFIG.parent, HELP_SECTIONS,
                          {"resume": "continue the last run in output_dir"}, DEFAULT_CONFIG), end="")
        return {}
    if report.unused:
        print("config keys forge accepts but does not use: " + ", ".join(report.unused))
    for note in report.notes:
        print(f"using {note}")
    return asyncio.run(main(cfg, resume=parsed.flags.get("resume", False)))


if __name__ == "__main__":
    cli()
