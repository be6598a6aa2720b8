"""`CISPOLoss`: Clipped IS-weight Policy Optimization, MiniMax-M1 (MiniMax 2025, arXiv:2506.13585).

    r_t  = exp(logp_t - b_t)
    l_t  = -sg(clip(r_t, 1 - clip_low, 1 + clip_high)) * A_t * logp_t
    loss = token-mean(l)

Clips the importance weight, never the gradient: every token keeps contributing (PPO/GRPO
drop the gradient of clipped tokens, which are often rare "fork" tokens). The paper sets no
lower bound (``clip_low=None``) and tunes only ``clip_high``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from forge.config.registry import register
from forge.losses.common import LossInputs, PolicyLoss, masked_mean


@register("loss", "cispo", "CISPOLoss")
class CISPOLoss(PolicyLoss):
    default_agg = "token-mean"
    needs_old_logprobs = True

    def __init__(self, clip_low: float | None = None, clip_high: float = 0.28, beta: float = 0.0, **kw) -> None:
        super().__init__(beta=beta, **kw)
        if clip_high <= 0 or (clip_low is not None and not 0 <= clip_low <= 1):
            raise ValueError(f"need clip_high > 0 and clip_low in [0, 1] or None, got {clip_low}, {clip_high}")
        self.clip_low, self.clip_high = clip_low, clip_high

    def policy_loss(self, x: LossInputs, stats: dict[str, Tensor]) -> Tensor:
        ratio = torch.exp(x.log_ratio()).detach()
        hi = 1 + self.clip_high
        lo = None if self.clip_low is None else 1 - self.clip_low
        stats["clip_frac_high"] = masked_mean((ratio > hi).to(x.mask.dtype), x.mask)
        if lo is not None:
            stats["clip_frac_low"] = masked_mean((ratio < lo).to(x.mask.dtype), x.mask)
        w = ratio.clamp(min=lo, max=hi)
        return -w * x.advantages * x.logprobs
