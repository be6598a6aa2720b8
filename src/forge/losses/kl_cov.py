"""`KLCovLoss`: KL-Cov, Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for
Reasoning Language Models" (arXiv:2505.22617).

    r_t   = exp(logp_t - b_t)
    Cov_t = (logp_t - mean logp) (A_t - mean A)                (see forge.losses.cov)
    T_k   = the k = max(1, floor(kl_ratio * N)) trained tokens of largest Cov_t
    l_t   = -A_t r_t + kl_coef * |logp_t - b_t| * [t in T_k]
    loss  = agg(l)

No ratio clip: the KL penalty on the top-covariance tokens is what keeps entropy from
collapsing.
"""

from __future__ import annotations

import torch
from torch import Tensor

from forge.config.registry import register
from forge.losses.common import LossInputs, PolicyLoss
from forge.losses.cov import token_covariance


@register("loss", "kl_cov", "KLCovLoss")
class KLCovLoss(PolicyLoss):
    default_agg = "token-mean"
    needs_old_logprobs = True

    def __init__(self, kl_ratio: float = 2e-3, kl_coef: float = 1.0, beta: float = 0.0, **kw) -> None:
        super().__init__(beta=beta, **kw)
        if not 0 <= kl_ratio <= 1:
            raise ValueError(f"kl_ratio must be in [0, 1], got {kl_ratio}")
        self.kl_ratio, self.kl_coef = kl_ratio, kl_coef

    def policy_loss(self, x: LossInputs, stats: dict[str, Tensor]) -> Tensor:
        d = x.log_ratio()
        loss = -x.advantages * torch.exp(d)
        mb = x.mask.bool()
        n_tok = int(mb.sum().item())
        if n_tok == 0:
            return loss
        k = max(1, int(self.kl_ratio * n_tok))
        cov = token_covariance(x).masked_fill(~mb, float("-inf")).flatten()
        top = torch.topk(cov, k).indices
        sel = torch.zeros_like(cov, dtype=torch.bool)
        sel[top] = True
        sel = sel.view_as(d)
        stats["kl_cov_frac"] = x.mask.new_tensor(k / n_tok)
        return loss + self.kl_coef * d.abs() * sel.to(d.dtype)
