"""`SAPOLoss`: Soft Adaptive Policy Optimization, Gao et al. 2025 (Qwen, arXiv:2511.20347).

A smooth, temperature-controlled gate replaces the hard clip:

    r_t  = exp(logp_t - b_t)
    tau  = tau_pos if A_t > 0 else tau_neg
    f(r) = sigmoid(tau * (r - 1)) * 4 / tau
    l_t  = -f(r_t) * A_t
    loss = seq-mean-token-mean(l)

Derivation of the gate's effect: d f(r_t) / d theta = 4 s (1 - s) * r_t * d logp_t with
s = sigmoid(tau (r_t - 1)). At r = 1, s = 1/2 and 4 s (1 - s) = 1: on-policy tokens get exactly
the policy gradient ``A * d logp``. Away from r = 1 the weight 4 s (1 - s) = sech^2(tau (r-1)/2)
decays smoothly (faster for larger tau) instead of dropping to 0 at a hard boundary; tau_neg >
tau_pos damps negative-advantage updates more (they spread probability mass over the whole
vocabulary and destabilise more easily).
"""

from __future__ import annotations

import torch
from torch import Tensor

from forge.config.registry import register
from forge.losses.common import LossInputs, PolicyLoss, masked_mean


@register("loss", "sapo", "SAPOLoss")
class SAPOLoss(PolicyLoss):
    default_agg = "seq-mean-token-mean"
    needs_old_logprobs = True

    def __init__(self, tau_pos: float = 1.0, tau_neg: float = 1.05, beta: float = 0.0, **kw) -> None:
        super().__init__(beta=beta, **kw)
        if tau_pos <= 0 or tau_neg <= 0:
            raise ValueError(f"tau_pos and tau_neg must be > 0, got {tau_pos}, {tau_neg}")
        self.tau_pos, self.tau_neg = float(tau_pos), float(tau_neg)

    def policy_loss(self, x: LossInputs, stats: dict[str, Tensor]) -> Tensor:
        a = x.advantages
        ratio = torch.exp(x.log_ratio())
        tau = torch.where(a > 0, ratio.new_tensor(self.tau_pos), ratio.new_tensor(self.tau_neg))
        s = torch.sigmoid(tau * (ratio - 1))
        stats["gate_weight_mean"] = masked_mean((4 * s * (1 - s)).detach(), x.mask)
        return -(4.0 / tau) * s * a
