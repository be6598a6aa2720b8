"""`GMPOLoss`: Geometric-Mean Policy Optimization, Zhao et al. 2025 (arXiv:2507.20673).

Maximises the geometric mean of the token-level rewards instead of the arithmetic mean, with the
clip done in log space (a wider range is safe since outliers weigh less):

    d_t    = logp_t - b_t,   c_t = clamp(d_t, -clip_low, clip_high)
    sgn    = sign(A_i)
    g_t    = sgn * min(sgn * d_t, sgn * c_t)            (pessimistic, as PPO's min)
    rho_i  = exp( 1/|o_i| sum_t g_t )                   (geometric mean of clipped ratios)
    L_i    = -A_i * rho_i,   loss = 1/|S| sum_i L_i

``A_i`` is the sequence advantage (the masked mean of token advantages if ``[B, T]`` are
given). Implemented by broadcasting L_i over the sequence's tokens and aggregating with
``seq-mean-token-mean``, which gives exactly the mean over sequences.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from forge.config.registry import register
from forge.losses.common import LossInputs, PolicyLoss, ppo_clip_stats


@register("loss", "gmpo", "GMPOLoss")
class GMPOLoss(PolicyLoss):
    default_agg = "seq-mean-token-mean"
    needs_old_logprobs = True

    def __init__(self, clip_low: float = 0.4, clip_high: float = 0.4, beta: float = 0.0, **kw) -> None:
        super().__init__(beta=beta, **kw)
        if clip_low < 0 or clip_high < 0:
            raise ValueError(f"clip_low and clip_high (log space) must be >= 0, got {clip_low}, {clip_high}")
        self.clip_low, self.clip_high = clip_low, clip_high

    def policy_loss(self, x: LossInputs, stats: dict[str, Tensor]) -> Tensor:
        d = x.log_ratio()
        a_seq = x.seq_advantages
        sgn = torch.sign(a_seq)[:, None]
        g = sgn * torch.minimum(sgn * d, sgn * d.clamp(min=-self.clip_low, max=self.clip_high))
        n = x.mask.sum(1).clamp(min=1)
        rho = torch.exp((g * x.mask).sum(1) / n)
        stats.update(ppo_clip_stats(torch.exp(d), a_seq[:, None].expand_as(d), x.mask,
                                    math.exp(-self.clip_low), math.exp(self.clip_high)))
        return (-a_seq * rho)[:, None].expand_as(d)
