"""`GPGLoss`: Group Policy Gradient, Chu et al. 2025 (arXiv:2504.02546).

Plain policy gradient on group-normalised advantages: no ratio, no clip, no KL, no critic:

    loss = token-mean( -A_t * logp_t )

Use with ``compute_advantages(method="gpg")`` (group mean baseline, std normalisation and the
paper's alpha = B / (B - M) correction for zero-variance groups).
"""

from __future__ import annotations

from torch import Tensor

from forge.config.registry import register
from forge.losses.common import LossInputs, PolicyLoss


@register("loss", "gpg", "GPGLoss")
class GPGLoss(PolicyLoss):
    default_agg = "token-mean"

    def __init__(self, beta: float = 0.0, **kw) -> None:
        super().__init__(beta=beta, **kw)

    def policy_loss(self, x: LossInputs, stats: dict[str, Tensor]) -> Tensor:
        return -x.advantages * x.logprobs
