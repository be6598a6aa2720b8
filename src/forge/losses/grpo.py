"""`GRPOLoss`: PPO-clipped surrogate with group-relative advantages, asymmetric and dual clip.

    r_t  = exp(logp_t - b_t)                                   (b: behaviour policy)
    l_t  = max(-A_t r_t, -A_t clip(r_t, 1 - clip_low, 1 + clip_high))
    l_t  = min(l_t, -A_t * dual_clip)   where A_t < 0          (dual clip, if set)
    loss = agg(l_t) + beta * agg(KL_t(pi || pi_ref))

GRPO: Shao et al. 2024 (arXiv:2402.03300); PPO: Schulman et al. 2017; clip-higher
(``clip_high > clip_low``): DAPO, Yu et al. 2025 (arXiv:2503.14476); dual clip: Ye et al.
2020, "Mastering Complex Control in MOBA Games with Deep RL" (c > 1 bounds the loss of
negative-advantage tokens whose ratio exploded).
"""

from __future__ import annotations

import torch
from torch import Tensor

from forge.config.registry import register
from forge.losses.common import LossInputs, PolicyLoss, masked_mean, ppo_clip_stats


@register("loss", "grpo", "GRPOLoss")
class GRPOLoss(PolicyLoss):
    default_agg = "seq-mean-token-mean"
    needs_old_logprobs = True

    def __init__(
        self,
        clip_low: float = 0.2,
        clip_high: float | None = None,
        beta: float = 0.04,
        agg: str | None = None,
        dual_clip: float | None = None,
        **kw,
    ) -> None:
        super().__init__(beta=beta, agg=agg, **kw)
        clip_high = clip_low if clip_high is None else clip_high
        if not (0 <= clip_low < 1) or clip_high < 0:
            raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
        if dual_clip is not None and dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        self.clip_low, self.clip_high, self.dual_clip = clip_low, clip_high, dual_clip

    def policy_loss(self, x: LossInputs, stats: dict[str, Tensor]) -> Tensor:
        a = x.advantages
        ratio = torch.exp(x.log_ratio())
        lo, hi = 1 - self.clip_low, 1 + self.clip_high
        loss = torch.maximum(-a * ratio, -a * ratio.clamp(min=lo, max=hi))
        stats.update(ppo_clip_stats(ratio, a, x.mask, lo, hi))
        if self.dual_clip is not None:
            cap = -a * self.dual_clip
            dual = (a < 0) & (loss > cap)
            loss = torch.where(a < 0, torch.minimum(loss, cap), loss)
            stats["dual_clip_frac"] = masked_mean(dual.to(x.mask.dtype), x.mask)
        return loss
