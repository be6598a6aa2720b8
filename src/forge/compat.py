"""torchforge's public names, as thin aliases of forge's: code typed from torchforge's docs and
its apps/grpo/main.py imports and runs unchanged.

Every alias is importable from here. Those whose torchforge module sits below this one are
defined there (`forge.types.LauncherConfig`, `forge.observability.perf_tracker.Tracer`,
`forge.observability.metric_actors.get_or_create_metric_logger`) and re-exported here, so that
imports point one way (compat imports the library, never the reverse); the other torchforge
paths (`forge.data_models.*`, `forge.util.config`) are one-line modules re-exporting from this one.

    torchforge                                   forge
    forge.data_models.completion.Completion      forge.types.Completion
    forge.data_models.episode.Episode            forge.types.Episode
    forge.types.{LauncherConfig,ProvisionerConfig} the `provisioner` config (local | monarch, with a job for hosts)
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
from collections.abc import Callable, Sequence
from typing import Any

import torch

# torchforge names defined where they belong (their torchforge module paths), re-exported here
from forge.observability.metric_actors import get_or_create_metric_logger
from forge.observability.perf_tracker import Tracer, trace
from forge.types import Completion, Episode, Group, Launcher, LauncherConfig, ProvisionerConfig

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
