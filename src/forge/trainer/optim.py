"""AdamW and the warm-up + constant/linear/cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch

from forge.trainer.config import LRSchedulerConfig, OptimizerConfig


def build_optimizer(params, cfg: OptimizerConfig, device: torch.device) -> torch.optim.Optimizer:
    cfg.validate()
    params = [p for p in params if p.requires_grad]
    # fused AdamW is one kernel per step on CUDA; CPU keeps the foreach path
    fused = device.type == "cuda"
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, fused=fused, foreach=None if fused else True)


def lr_factor(step: int, cfg: LRSchedulerConfig) -> float:
    """Multiplier of the base lr for optimizer step `step` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps  # never 0: the first step already learns
    if cfg.decay == "constant":
        return 1.0
    total = max(int(cfg.total_steps or 1) - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / total, 1.0)
    if cfg.decay == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_lr_scheduler(opt: torch.optim.Optimizer, cfg: LRSchedulerConfig) -> torch.optim.lr_scheduler.LambdaLR:
    cfg.validate()
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
