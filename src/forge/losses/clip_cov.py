"""`ClipCovLoss`: Clip-Cov, Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for
Reasoning Language Models" (arXiv:2505.22617).

    r_t   = exp(logp_t - b_t)
    l_t   = max(-A_t r_t, -A_t clip(r_t, 1 - clip_low, 1 + clip_high))   (PPO; None: no clip)
    Cov_t = (logp_t - mean logp) (A_t - mean A)                           (see forge.losses.cov)
    E     = {t trained, not PPO-clipped, cov_lb < Cov_t < cov_ub}
    pick  k = min(|E|, max(1, floor(cov_ratio * N))) tokens of E uniformly at random (N = trained
          tokens) and detach their gradient: l_t -> sg(l_t)
    loss  = agg(l)

Pass ``seed`` for a reproducible choice (a private generator); otherwise torch's global RNG.
"""

from __future__ import annotations

import torch
from torch import Tensor

from forge.config.registry import register
from forge.losses.common import LossInputs, PolicyLoss, ppo_clip_stats
from forge.losses.cov import token_covariance


@register("loss", "clip_cov", "ClipCovLoss")
class ClipCovLoss(PolicyLoss):
    default_agg = "token-mean"
    needs_old_logprobs = True

    def __init__(
        self,
        cov_ratio: float = 2e-4,
        cov_lb: float = 1.0,
        cov_ub: float = 5.0,
        clip_low: float | None = 0.2,
        clip_high: float | None = 0.2,
        beta: float = 0.0,
        seed: int | None = None,
        **kw,
    ) -> None:
        super().__init__(beta=beta, **kw)
        if not 0 <= cov_ratio <= 1:
            raise ValueError(f"cov_ratio must be in [0, 1], got {cov_ratio}")
        if cov_lb >= cov_ub:
            raise ValueError(f"need cov_lb < cov_ub, got {cov_lb}, {cov_ub}")
        self.cov_ratio, self.cov_lb, self.cov_ub = cov_ratio, cov_lb, cov_ub
        self.clip_low, self.clip_high = clip_low, clip_high
        self._gen = None if seed is None else torch.Generator().manual_seed(seed)

    def policy_loss(self, x: LossInputs, stats: dict[str, Tensor]) -> Tensor:
        a = x.advantages
        ratio = torch.exp(x.log_ratio())
        loss1 = -a * ratio
        lo = 0.0 if self.clip_low is None else 1 - self.clip_low
        hi = float("inf") if self.clip_high is None else 1 + self.clip_high
        loss2 = -a * ratio.clamp(min=lo, max=hi)
        loss = torch.maximum(loss1, loss2)
        stats.update(ppo_clip_stats(ratio, a, x.mask, lo, hi))
        mb = x.mask.bool()
        cov = token_covariance(x)
        eligible = mb & (loss2 <= loss1) & (cov > self.cov_lb) & (cov < self.cov_ub)
        idx = torch.nonzero(eligible.flatten()).flatten()
        n_tok = int(mb.sum().item())
        k = min(idx.numel(), max(1, int(self.cov_ratio * n_tok))) if n_tok else 0
        chosen = torch.zeros(eligible.numel(), dtype=torch.bool, device=eligible.device)
        if k:
            perm = torch.randperm(idx.numel(), generator=self._gen)[:k].to(idx.device)
            chosen[idx[perm]] = True
        chosen = chosen.view_as(eligible)
        stats["cov_clip_frac"] = x.mask.new_tensor(k / max(n_tok, 1))
        return torch.where(chosen, loss.detach(), loss)
