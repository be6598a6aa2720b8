"""`SimpleGRPOLoss`: torchforge's seed GRPO loss (single update per batch).

    per_token = exp(logp - sg(logp)) * A - beta * k3(logp, ref)
    loss      = -1/|S| sum_i ( sum_t per_token_it * m_it / sum_t m_it )

The ratio is against the *detached current* logprobs, so its value is 1 and its gradient is
the policy gradient ``A * d logp``: exact when each batch is used for one optimizer step.
GRPO: Shao et al. 2024, "DeepSeekMath" (arXiv:2402.03300); the form follows TRL's trainer.
Ignores ``old_logprobs``/``generator_logprobs`` except for the optional ``tis_cap`` weight.
"""

from __future__ import annotations

import torch
from torch import Tensor

from forge.config.registry import register
from forge.losses.common import LossInputs, PolicyLoss


@register("loss", "simple_grpo", "SimpleGRPOLoss")
class SimpleGRPOLoss(PolicyLoss):
    default_agg = "seq-mean-token-mean"

    def __init__(self, beta: float = 0.1, **kw) -> None:
        super().__init__(beta=beta, **kw)

    def policy_loss(self, x: LossInputs, stats: dict[str, Tensor]) -> Tensor:
        ratio = torch.exp(x.logprobs - x.logprobs.detach())
        stats["ratio_mean"] = x.mask.new_tensor(1.0)
        stats["approx_kl"] = x.mask.new_tensor(0.0)
        return -ratio * x.advantages
