"""torchforge's public names, as thin aliases of forge's: code typed from torchforge's docs and
its apps/grpo/main.py imports and runs unchanged.

Every alias is defined here, in one place; the torchforge module paths (`forge.data_models.*`,
`forge.observability.perf_tracker`, `forge.observability.metric_actors`, `forge.util.config`)
are one-line modules that re-export from this one, and `forge.types` / `forge.observability`
resolve their torchforge names here lazily.

    torchforge                                   forge
    forge.data_models.completion.Completion      forge.types.Completion
    forge.data_models.episode.Episode            forge.types.Episode
    forge.types.{LauncherConfig,ProvisionerConfig} the `provisioner` config (one host: local | monarch)
    forge.observability.get_or_create_metric_logger  forge.observability.MetricLogger
    forge.observability.perf_tracker.{Tracer,trace}  record_metric of durations
    forge.util.config.parse                      forge.config (YAML + CLI overrides)
    forge.actors.trainer.TitanTrainer / RLTrainer   forge.actors.Trainer (forge's own FSDP2 trainer,
                                                 not torchtitan: same endpoints and config keys)
    apps.grpo.main.{DatasetActor, RewardActor, ComputeAdvantages, Group, collate,
                    simple_grpo_loss}            forge.actors.*, forge.types.Group, collate below,
                                                 forge.losses.SimpleGRPOLoss
"""

from __future__ import annotations

import functools
import sys
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Sequence

import torch

from forge.observability.loggers import MetricLogger, build_backends
from forge.observability.metrics import Reduce, record_metric
from forge.types import Completion, Episode, Group

# ---------------------------------------------------------------- forge.types


class Launcher(str, Enum):
    SLURM = "slurm"
    MAST = "mast"


@dataclass
class LauncherConfig:
    """torchforge's multi-host launcher settings. forge runs on one host for now: constructing
    one for a real launcher is refused with the reason instead of being dropped."""

    launcher: Launcher | str = Launcher.SLURM
    job_name: str = ""
    services: dict[str, Any] = field(default_factory=dict)
    actors: dict[str, Any] = field(default_factory=dict)
    cpu: int | None = None
    memMB: int | None = None  # noqa: N815 (torchforge's name)
    gpus_per_node: int | None = None
    account: str | None = None
    qos: str | None = None

    def __post_init__(self) -> None:
        raise NotImplementedError(
            f"LauncherConfig(launcher={str(getattr(self.launcher, 'value', self.launcher))!r}): forge runs on one "
            "host for now (init_provisioner('local') or init_provisioner('monarch')); multi-host launch is not built")


@dataclass
class ProvisionerConfig:
    launcher_config: LauncherConfig | None = None


# ---------------------------------------------------------------- forge.observability


class _Endpoint:
    """`.call_one(...)` / `.call(...)` on a controller-side object, as on an actor handle."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn

    async def call_one(self, *args: Any, **kwargs: Any) -> Any:
        out = self.fn(*args, **kwargs)
        return await out if hasattr(out, "__await__") else out

    async def call(self, *args: Any, **kwargs: Any) -> Any:
        return await self.call_one(*args, **kwargs)


class _GlobalLogger:
    """torchforge's global logger actor, over forge's controller-side `MetricLogger`:
    `init_backends.call_one(cfg)`, `flush.call_one(step)`, `shutdown.call_one()`."""

    def __init__(self, run_dir: str = "outputs/metrics"):
        self.run_dir = run_dir
        self.logger: MetricLogger | None = None
        self.init_backends = _Endpoint(self._init_backends)
        self.flush = _Endpoint(self._flush)
        self.shutdown = _Endpoint(self._shutdown)

    def _init_backends(self, config: dict[str, Any]) -> None:
        self.logger = MetricLogger(build_backends(dict(config), total_steps=None, run_dir=self.run_dir))

    async def _flush(self, global_step: int) -> dict[str, float]:
        if self.logger is None:
            raise RuntimeError("flush before init_backends: call `await mlogger.init_backends.call_one(cfg)` first")
        return await self.logger.flush(global_step)

    def _shutdown(self) -> None:
        if self.logger is not None:
            self.logger.close()
            self.logger = None


_GLOBAL_LOGGER: _GlobalLogger | None = None


async def get_or_create_metric_logger(proc_mesh: Any = None, process_name: str | None = None) -> _GlobalLogger:
    """The one controller-side metric logger (every process's `record_metric` reaches it)."""
    global _GLOBAL_LOGGER
    if _GLOBAL_LOGGER is None:
        _GLOBAL_LOGGER = _GlobalLogger()
    return _GLOBAL_LOGGER


class Tracer:
    """torchforge's perf tracer: `t = Tracer("trainer_perf/step"); t.start(); ...; t.step("fwd");
    ...; t.stop()` records `<prefix>/<step>/duration_avg_s` (and `_max_s`) and
    `<prefix>/total_duration_avg_s` through `record_metric`. `timer="gpu"` synchronises CUDA
    before reading the clock."""

    def __init__(self, prefix: str, track_memory: bool = False, timer: str = "cpu"):
        if timer not in ("cpu", "gpu"):
            raise ValueError(f"Tracer timer must be 'cpu' or 'gpu', got {timer!r}")
        self.prefix, self.timer = prefix, timer
        self.t0: float | None = None
        self.last: float | None = None

    def _now(self) -> float:
        if self.timer == "gpu" and torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def start(self) -> None:
        self.t0 = self.last = self._now()

    def step(self, name: str) -> None:
        if self.last is None:
            raise RuntimeError(f"Tracer('{self.prefix}').step('{name}') before start()")
        now = self._now()
        record_metric(f"{self.prefix}/{name}/duration_avg_s", now - self.last, Reduce.MEAN)
        record_metric(f"{self.prefix}/{name}/duration_max_s", now - self.last, Reduce.MAX)
        self.last = now

    def stop(self) -> None:
        if self.t0 is None:
            raise RuntimeError(f"Tracer('{self.prefix}').stop() before start()")
        dt = self._now() - self.t0
        record_metric(f"{self.prefix}/total_duration_avg_s", dt, Reduce.MEAN)
        record_metric(f"{self.prefix}/total_duration_max_s", dt, Reduce.MAX)
        self.t0 = self.last = None


def trace(prefix: str, track_memory: bool = False, timer: str = "cpu") -> Callable[[Callable], Callable]:
    """Decorator: the function's duration as `<prefix>/total_duration_avg_s` (sync or async)."""

    def wrap(fn: Callable) -> Callable:
        import inspect

        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def run_async(*a: Any, **k: Any) -> Any:
                t = Tracer(prefix, track_memory, timer)
                t.start()
                try:
                    return await fn(*a, **k)
                finally:
                    t.stop()

            return run_async

        @functools.wraps(fn)
        def run(*a: Any, **k: Any) -> Any:
            t = Tracer(prefix, track_memory, timer)
            t.start()
            try:
                return fn(*a, **k)
            finally:
                t.stop()

        return run

    return wrap


# ---------------------------------------------------------------- forge.util.config


def parse(fn: Callable[[Any], Any]) -> Callable[[], Any]:
    """torchforge's `@parse`: `fn(cfg)` gets the DictConfig from `--config x.yaml` and overrides
    (every form forge's CLI takes); a config error prints its message and exits 2."""
    from omegaconf import OmegaConf

    from forge.config import compose, parse_cli, run_cli, to_container

    @functools.wraps(fn)
    def main(argv: list[str] | None = None) -> Any:
        def go(args: list[str]) -> Any:
            cfg = OmegaConf.create(to_container(compose(parse_cli(args))))
            return fn(cfg)

        return run_cli(go, sys.argv[1:] if argv is None else argv)

    return main


# ---------------------------------------------------------------- apps/grpo/main.py


def collate(batches: Sequence[Sequence[Episode]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """torchforge's `collate`: `[dp][bsz]` episodes -> one (inputs, targets) dict per data-parallel
    rank, each forge's collated batch (prompt_mask included, so no attention over padding)."""
    from forge.data.collate import collate_episodes

    inputs, targets = [], []
    for episodes in batches:
        i, t = collate_episodes(list(episodes))
        inputs.extend(i)
        targets.extend(t)
    return inputs, targets


def simple_grpo_loss(logits: torch.Tensor, response: torch.Tensor, ref_logprobs: torch.Tensor,
                     advantages: torch.Tensor, padding_mask: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """torchforge's `simple_grpo_loss` on logits (the last `response_len + 1` positions predict
    the response) = forge's `SimpleGRPOLoss(beta)` on their logprobs. Passed as
    `Trainer(loss=simple_grpo_loss)` it is that loss (`forge_loss_spec`), computed on chunked
    logprobs without materialising logits."""
    from forge.losses import SimpleGRPOLoss

    r = response.shape[1]
    lg = logits[:, -r - 1:-1] if logits.shape[1] > r else logits
    logprobs = torch.log_softmax(lg.float(), dim=-1).gather(-1, response.long().unsqueeze(-1)).squeeze(-1)
    return SimpleGRPOLoss(beta=beta)(logprobs, ref_logprobs, advantages, padding_mask.float())


simple_grpo_loss.forge_loss_spec = {"name": "simple_grpo", "beta": 0.1}  # type: ignore[attr-defined]

_ACTORS = ("DatasetActor", "RewardActor", "ComputeAdvantages", "Trainer", "Generator", "ReferenceModel",
           "ReplayBuffer")
_RENAMED = {"TitanTrainer": "Trainer", "RLTrainer": "Trainer", "Policy": "Generator"}


def __getattr__(name: str) -> Any:
    """Actors resolve lazily (importing them pulls in the engine and trainer)."""
    if name in _ACTORS or name in _RENAMED:
        import forge.actors

        return getattr(forge.actors, _RENAMED.get(name, name))
    raise AttributeError(f"module 'forge.compat' has no attribute '{name}'")


__all__ = [
    "Completion", "ComputeAdvantages", "DatasetActor", "Episode", "Generator", "Group", "Launcher",
    "LauncherConfig", "Policy", "ProvisionerConfig", "RLTrainer", "ReferenceModel", "ReplayBuffer", "RewardActor",
    "TitanTrainer", "Tracer", "Trainer", "collate", "get_or_create_metric_logger", "parse", "simple_grpo_loss",
    "trace",
]
