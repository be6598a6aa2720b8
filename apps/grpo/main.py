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
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import torch

from apps.grpo.agentic import rollout_env_group
from apps.grpo.config import GRPOConfig, episodes_per_step, load_grpo_config
from apps.grpo.support import (
    RolloutBudget,
    build_services,
    evaluate,
    resolve_model,
    sync_weights,
    weight_sync_config,
    write_learning_curve,
)
from forge.config import compose, parse_cli, to_container
from forge.config.help import format_help, wants_help, without_help
from forge.controller import init_provisioner, shutdown
from forge.data.collate import collate_episodes
from forge.data.datasets import DatasetConfig
from forge.engine.config import EngineConfig, SamplingParams
from forge.observability import MetricLogger, Reduce, build_backends, drain, record_metric
from forge.types import Episode

log = logging.getLogger("forge.grpo")
DEFAULT_CONFIG = Path(__file__).with_name("default.yaml")
# dict-typed blocks and the dataclasses that validate them (validate_sections), listed in --help
HELP_SECTIONS = {"dataset": DatasetConfig, "policy.engine_args": EngineConfig,
                 "policy.sampling_params": SamplingParams}


async def main(cfg: GRPOConfig, resume: bool = False,
               on_step: Callable[[int, Any], Awaitable[None]] | None = None) -> dict:
    """Run GRPO. `on_step(step, services)` (optional) runs after each training step: a hook for
    tests and experiments (fault injection, custom evaluation)."""
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    if isinstance(cfg.provisioner, str):
        init_provisioner(cfg.provisioner)
    else:  # {kind: monarch, share_gpus: true, ...}
        opts = dict(cfg.provisioner)
        init_provisioner(opts.pop("kind", "local"), **opts)
    sync = weight_sync_config(cfg)  # a bad transport/placement fails here, before any warm-up
    model_path = await asyncio.to_thread(resolve_model, cfg)  # may run the SFT warm-up (first time)
    max_steps = cfg.steps or 100
    logger = MetricLogger(build_backends(cfg.metric_logging, total_steps=max_steps, run_dir=run_dir))
    drain()  # records left in this process by earlier work (another run, a test) are not this run's
    s = await build_services(cfg, model_path, run_dir, sync)  # dataloader, policy, trainer, buffer, ...
    group_size = cfg.group_size
    groups_per_step = episodes_per_step(cfg) * cfg.replay_buffer.dp_size // group_size

    step = 0
    if resume:  # the trainer restores model/optimizer/RNG; we restore the data position and step
        loaded = (await s.trainer.load.call())[0]
        if loaded is None:
            log.warning("--resume: no checkpoint in %s; starting from scratch", run_dir / "checkpoints")
        else:
            extra = loaded["extra"]
            step = int(extra["step"])
            await s.dataloader.load_state_dict.call_one(extra["dataset"])
            await sync_weights(s, step)
            print(f"resumed at step {step}")

    before = await evaluate(cfg, s, step)
    print(f"held-out accuracy before training: {before['eval/accuracy']:.3f}")
    await logger.flush(step, extra=before)

    # the app saves (with the data position); torchforge configs put the interval under trainer
    checkpoint_interval = cfg.checkpoint_interval or cfg.trainer.checkpoint.interval
    budget = RolloutBudget(groups_per_step, ahead=cfg.off_by_n)
    stop = asyncio.Event()
    recent: list[list[Episode]] = []

    # ---------------------------------------------------------------- the two loops
    async def continuous_rollouts() -> None:
        while not stop.is_set():
            if not await budget.acquire(stop):
                return
            sample = await s.dataloader.sample.call_one()
            if sample is None:
                budget.refund()
                return
            if cfg.env is not None:  # agentic: multi-turn episodes in an environment (apps/grpo/agentic.py)
                t0 = time.perf_counter()
                group = await rollout_env_group(cfg, s, sample, group_size)
                t1 = t2 = time.perf_counter()
                if not group:  # the task's prompt is over max_req_tokens: draw another
                    budget.refund()
                    continue
            else:
                prompt, target = sample["request"], sample["target"]
                t0 = time.perf_counter()
                completions = await s.policy.generate.route(prompt, n=group_size)
                t1 = time.perf_counter()
                scores = await s.reward_actor.evaluate.route(
                    [prompt] * group_size, [c.text for c in completions], [target] * group_size)
                t2 = time.perf_counter()
                group_id = completions[0].metadata.get("request_id", id(completions))
                group = [
                    Episode(request=prompt, policy_version=c.generator_version, pad_id=s.pad_id,
                            request_len=len(c.prompt_ids), response_len=len(c.token_ids), target=target,
                            completion=c, reward=sc["total"], reward_breakdown=sc["breakdown"],
                            metadata={"group_id": f"{step}-{group_id}-{t0}"})
                    for c, sc in zip(completions, scores)
                ]
            advantages = await s.compute_advantages.compute.call_one(group)
            for ep, adv in zip(group, advantages):
                ep.advantage = adv
            if cfg.advantage.filter_zero_variance and len({ep.reward for ep in group}) == 1:
                record_metric("rollout/filtered_zero_variance_groups", 1, Reduce.SUM)
                budget.refund()  # DAPO dynamic sampling: this group teaches nothing; draw another
                continue
            t3 = time.perf_counter()
            if s.ref_model is not None:
                inputs, targets = collate_episodes(group)
                ref = await s.ref_model.forward.route(inputs, targets)
                for i, ep in enumerate(group):
                    ep.ref_logprobs = ref[i, : ep.response_len]
            t4 = time.perf_counter()
            await s.replay_buffer.add_group.call_one(group)
            record_rollout_metrics(group, s.correct_key, t1 - t0, t2 - t1, t4 - t3)
            recent.append(group)
            del recent[:-4]

    async def continuous_training() -> None:
        nonlocal step
        while step < max_steps:
            t0 = time.perf_counter()
            batch = await s.replay_buffer.sample.call_one(curr_policy_version=step)
            if batch is None:  # not enough fresh episodes yet
                await asyncio.sleep(0.02)
                continue
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
                await save_checkpoint(s, step)
            if on_step is not None:
                await on_step(step, s)
        stop.set()

    t_start = time.perf_counter()
    rollouts = [asyncio.create_task(continuous_rollouts()) for _ in range(max(1, cfg.rollout_threads))]
    try:
        await continuous_training()
    finally:
        stop.set()
        budget.wake()
        for t in rollouts:
            t.cancel()
        await asyncio.gather(*rollouts, return_exceptions=True)
    train_time = time.perf_counter() - t_start

    await save_checkpoint(s, step)
    after = await evaluate(cfg, s, step)
    await logger.flush(step + 1, extra=after)
    logger.close()
    await s.trainer.export_hf.call(str(run_dir / "final_hf"))
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


async def save_checkpoint(s, step: int) -> None:
    data_state = await s.dataloader.state_dict.call_one()
    await s.trainer.save.call(step, extra={"step": step, "dataset": data_state})


def cli(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    parsed = parse_cli(without_help(argv), flags=("resume",))
    cfg, report = load_grpo_config(to_container(compose(parsed, DEFAULT_CONFIG)))
    if wants_help(argv):
        print(format_help("forge grpo", __doc__, GRPOConfig, cfg, DEFAULT_CONFIG.parent, HELP_SECTIONS,
                          {"resume": "continue the last run in output_dir"}, DEFAULT_CONFIG), end="")
        return {}
    if report.unused:
        print("config keys forge accepts but does not use: " + ", ".join(report.unused))
    return asyncio.run(main(cfg, resume=parsed.flags.get("resume", False)))


if __name__ == "__main__":
    cli()
