"""`GSPOLoss`: Group Sequence Policy Optimization, Zheng et al. 2025 (Qwen, arXiv:2507.18071).

Sequence-level, length-normalised importance ratio, in the paper's token-level form (GSPO-token)
so token advantages are allowed:

    s_i    = exp( 1/|y_i| sum_t (logp_it - b_it) )
    s_it   = sg(s_i) * exp(logp_it - sg(logp_it))       (value s_i, gradient s_i * d logp_it)
    l_it   = max(-A_it s_it, -A_it clip(s_it, 1 - clip_low, 1 + clip_high))
    loss   = seq-mean-token-mean(l)                      (= 1/G sum_i 1/|y_i| sum_t l_it)

A whole sequence is clipped or not. The paper's ranges are tiny (3e-4 / 4e-4) since s_i is a
geometric mean. The log of s_i is capped at 10 (value only) against overflow.
"""

from __future__ import annotations

import torch
from torch import Tensor

from forge.config.registry import register
from forge.losses.common import LossInputs, PolicyLoss, ppo_clip_stats


@register("loss", "gspo", "GSPOLoss")
class GSPOLoss(PolicyLoss):
    default_agg = "seq-mean-token-mean"
    needs_old_logprobs = True

    def __init__(self, clip_low: float = 3e-4, clip_high: float = 4e-4, beta: float = 0.0, **kw) -> None:
        super().__init__(beta=beta, **kw)
        if not (0 <= clip_low < 1) or clip_high < 0:
            raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
        self.clip_low, self.clip_high = clip_low, clip_high

    def policy_loss(self, x: LossInputs, stats: dict[str, Tensor]) -> Tensor:
        log_r = x.log_ratio()
        seq_log_s = (log_r.detach() * x.mask).sum(1) / x.mask.sum(1).clamp(min=1)
        log_s_tok = x.logprobs - x.logprobs.detach() + seq_log_s.clamp(max=10.0)[:, None]
        s = torch.exp(log_s_tok)
        a = x.advantages
        lo, hi = 1 - self.clip_low, 1 + self.clip_high
        stats.update(ppo_clip_stats(s, a, x.mask, lo, hi))
        has = (x.mask.sum(1) > 0).to(x.mask.dtype)
        stats["seq_ratio_mean"] = (torch.exp(seq_log_s) * has).sum().detach() / has.sum().clamp(min=1)
        return torch.maximum(-a * s, -a * s.clamp(min=lo, max=hi))
