"""`ReinforceLoss`: REINFORCE with a detached (optionally clipped) importance weight.

    w_t  = sg(clip(exp(logp_t - b_t), 1 - clip_ratio, 1 + clip_ratio))   (no clip if None)
    loss = token-mean( -w_t * A_t * logp_t )

``b`` is the behaviour policy (see ``forge.losses.common``). Unlike PPO/GRPO clipping, tokens
outside the trust region keep their gradient, only with a bounded weight (torchforge's
ReinforceLoss; Williams 1992, "Simple statistical gradient-following algorithms").
"""

from __future__ import annotations

import torch
from torch import Tensor

from forge.config.registry import register
from forge.losses.common import LossInputs, PolicyLoss, masked_mean


@register("loss", "reinforce", "ReinforceLoss")
class ReinforceLoss(PolicyLoss):
    default_agg = "token-mean"

    def __init__(self, clip_ratio: float | None = None, **kw) -> None:
        super().__init__(**kw)
        if clip_ratio is not None and not 0 < clip_ratio:
            raise ValueError(f"clip_ratio must be > 0 or None, got {clip_ratio}")
        self.clip_ratio = clip_ratio

    def policy_loss(self, x: LossInputs, stats: dict[str, Tensor]) -> Tensor:
        ratio = torch.exp(x.log_ratio()).detach()
        if self.clip_ratio is not None:
            lo, hi = 1 - self.clip_ratio, 1 + self.clip_ratio
            stats["clip_frac_low"] = masked_mean((ratio < lo).to(x.mask.dtype), x.mask)
            stats["clip_frac_high"] = masked_mean((ratio > hi).to(x.mask.dtype), x.mask)
            ratio = ratio.clamp(min=lo, max=hi)
        return -ratio * x.advantages * x.logprobs
