"""The runtime demo: a small service graph on the chosen provisioner, metrics through the logger.

    python -m apps.demo.main                              # local (in-process) backend
    python -m apps.demo.main --provisioner monarch        # real processes through Monarch
    python -m apps.demo.main --config apps/demo/monarch.yaml --steps 8 --generator.num_replicas 3

A toy "policy improvement" loop with the shape of the GRPO loop: a `Generator` service
(replicas sample numbers from a Gaussian policy), a `Scorer` service (reward = closeness to a
target), an `Accumulator` actor (keeps the best samples) and a per-step update pushed to every
generator replica with `.fanout()`. Every actor records metrics where it runs; the
controller's `MetricLogger` gathers them once per step (console table + JSONL).
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from forge.config import load_config
from forge.config.help import format_help, wants_help, without_help
from forge.controller import (
    ActorOptions,
    ForgeActor,
    endpoint,
    init_provisioner,
    shutdown,
)
from forge.observability import MetricLogger, Reduce, build_backends, record_metric

DEFAULT_YAML = Path(__file__).with_name("demo.yaml")


def _placement(**kw: Any) -> ActorOptions:
    return ActorOptions(**{"timeout_s": 60.0, **kw})  # the demo's calls are quick: fail fast


@dataclass
class DemoConfig:
    provisioner: Literal["local", "monarch"] | None = None  # None: $FORGE_PROVISIONER, else local
    steps: int = 5
    samples_per_step: int = 32
    requests_per_step: int = 4  # generator calls in flight at once each step
    target: float = 3.0
    init_mean: float = 0.0
    init_std: float = 2.0
    lr: float = 0.5
    seed: int = 0
    generator: ActorOptions = field(default_factory=lambda: _placement(num_replicas=2))
    scorer: ActorOptions = field(default_factory=_placement)
    accumulator: ActorOptions = field(default_factory=_placement)
    run_dir: str = "runs/demo"
    metric_logging: dict[str, dict[str, Any]] = field(default_factory=lambda: {"console": {}, "jsonl": {}})

    def __post_init__(self) -> None:
        for name in ("steps", "samples_per_step", "requests_per_step"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class Generator(ForgeActor):
    """A Gaussian "policy": samples numbers; `update` moves its mean (the weight sync)."""

    def __init__(self, mean: float, std: float, seed: int):
        self.mean, self.std, self.version = mean, std, 0
        self.rng = torch.Generator().manual_seed(seed + 1000 * self.replica_id + self.rank)

    @endpoint
    async def generate(self, n: int) -> dict[str, Any]:
        values = (self.mean + self.std * torch.randn(n, generator=self.rng)).tolist()
        record_metric("generator/generate/sum_samples", n, Reduce.SUM)
        record_metric("generator/generate/mean_value", sum(values) / n, Reduce.MEAN)
        return {"values": values, "replica": self.replica_id, "version": self.version}

    @endpoint
    async def update(self, mean: float, std: float, version: int) -> int:
        self.mean, self.std, self.version = mean, std, version
        record_metric("generator/update/count", 1, Reduce.SUM)
        return self.replica_id


class Scorer(ForgeActor):
    @endpoint
    async def score(self, values: list[float], target: float) -> list[float]:
        rewards = [-abs(v - target) for v in values]
        for r in rewards:
            record_metric("reward/mean", r, Reduce.MEAN)
            record_metric("reward/std", r, Reduce.STD)
            record_metric("reward/max", r, Reduce.MAX)
        return rewards


class Accumulator(ForgeActor):
    """Keeps the elite samples of the current step and proposes the next policy."""

    def __init__(self, elite_frac: float = 0.25):
        self.elite_frac = elite_frac
        self.pairs: list[tuple[float, float]] = []
        self.seen = 0

    @endpoint
    async def add(self, values: list[float], rewards: list[float]) -> int:
        self.pairs.extend(zip(values, rewards))
        self.seen += len(values)
        record_metric("accumulator/seen", self.seen, Reduce.MAX)
        return len(self.pairs)

    @endpoint
    async def propose(self, mean: float, std: float, lr: float) -> tuple[float, float]:
        elite = sorted(self.pairs, key=lambda p: p[1], reverse=True)[: max(1, int(len(self.pairs) * self.elite_frac))]
        self.pairs = []
        elite_mean = sum(v for v, _ in elite) / len(elite)
        elite_std = (sum((v - elite_mean) ** 2 for v, _ in elite) / len(elite)) ** 0.5
        new_mean = mean + lr * (elite_mean - mean)
        new_std = max(0.05, std + lr * (elite_std - std))
        record_metric("accumulator/elite_mean", elite_mean, Reduce.MEAN)
        return new_mean, new_std


async def run(cfg: DemoConfig) -> list[dict[str, float]]:
    kind = init_provisioner(cfg.provisioner).kind
    run_dir = Path(cfg.run_dir) / time.strftime("%Y%m%d-%H%M%S")
    logger: MetricLogger | None = None
    try:
        t0 = time.perf_counter()
        generator, scorer, accumulator = await asyncio.gather(
            Generator.options(**vars(cfg.generator)).as_service(mean=cfg.init_mean, std=cfg.init_std, seed=cfg.seed),
            Scorer.options(**vars(cfg.scorer)).as_service(),
            Accumulator.options(**vars(cfg.accumulator)).as_actor(),
        )
        print(f"[demo] {kind}: spawned generator x{generator.num_replicas}, scorer "
              f"x{scorer.num_replicas}, accumulator in {time.perf_counter() - t0:.2f}s", flush=True)
        logger = MetricLogger(build_backends(cfg.metric_logging, total_steps=cfg.steps, run_dir=run_dir))
        mean, std = cfg.init_mean, cfg.init_std
        per_call = max(1, cfg.samples_per_step // cfg.requests_per_step)
        for step in range(1, cfg.steps + 1):
            t_step = time.perf_counter()
            batches = await asyncio.gather(*(generator.generate.route(per_call) for _ in range(cfg.requests_per_step)))
            values = [v for b in batches for v in b["values"]]
            rewards = await scorer.score.route(values, cfg.target)
            await accumulator.add.call_one(values, rewards)
            mean, std = await accumulator.propose.call_one(mean, std, cfg.lr)
            await generator.update.fanout(mean, std, step)  # every replica gets the new policy
            await logger.flush(step, extra={
                "policy/mean": mean, "policy/std": std,
                "generator/replicas_used": float(len({b["replica"] for b in batches})),
                "time/step_s": time.perf_counter() - t_step,
            })
        return logger.history
    finally:
        if logger is not None:
            logger.close()
        await shutdown()
        print(f"[demo] done; metrics in {run_dir}", flush=True)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    cfg, _, _ = load_config(without_help(argv), DemoConfig, default_yaml=DEFAULT_YAML)
    if wants_help(argv):
        print(format_help("forge demo", __doc__, DemoConfig, cfg, DEFAULT_YAML.parent, default_yaml=DEFAULT_YAML), end="")
        return
    history = asyncio.run(run(cfg))
    first, last = history[0], history[-1]
    print(f"[demo] reward/mean {first['reward/mean']:.3f} -> {last['reward/mean']:.3f} "
          f"(policy mean {first['policy/mean']:.2f} -> {last['policy/mean']:.2f}, target {cfg.target})")


if __name__ == "__main__":
    main()
