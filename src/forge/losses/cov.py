"""Token covariance used by Clip-Cov and KL-Cov (Cui et al. 2025, arXiv:2505.22617).

    Cov_t = (logp_t - mean(logp)) * (A_t - mean(A))

means over all trained tokens of the batch. Entropy falls when high-probability tokens get
positive advantage (positive covariance); both methods act on the few high-covariance tokens.
"""

from __future__ import annotations

from torch import Tensor

from forge.losses.common import LossInputs, masked_mean


def token_covariance(x: LossInputs) -> Tensor:
    """Detached per-token centred product ``[B, T]`` (0 on padding)."""
    lp = x.logprobs.detach()
    return (lp - masked_mean(lp, x.mask)) * (x.advantages - masked_mean(x.advantages, x.mask)) * x.mask
