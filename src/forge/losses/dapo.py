"""`DAPOLoss` and `overlong_penalty`: DAPO, Yu et al. 2025 (arXiv:2503.14476).

DAPO = GRPO's clipped surrogate with clip-higher (eps_low=0.2, eps_high=0.28), token-level
aggregation (``token-mean``: every token weighs the same, long answers are not diluted) and no
KL term. Dynamic sampling lives in ``forge.advantages.filter_zero_variance``; overlong reward
shaping is :func:`overlong_penalty`, added to the task reward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from forge.config.registry import register
from forge.losses.grpo import GRPOLoss


@register("loss", "dapo", "DAPOLoss")
class DAPOLoss(GRPOLoss):
    default_agg = "token-mean"

    def __init__(self, clip_low: float = 0.2, clip_high: float | None = 0.28, beta: float = 0.0, agg: str | None = None, **kw) -> None:
        super().__init__(clip_low=clip_low, clip_high=clip_high, beta=beta, agg=agg, **kw)


def overlong_penalty(lengths: Tensor | list[int], max_len: int, buffer: int, factor: float = 1.0) -> Tensor:
    """DAPO soft overlong punishment (eq. 13), to add to the reward of each response.

        R(l) = 0                                    l <= max_len - buffer
             = ((max_len - buffer) - l) / buffer    max_len - buffer < l <= max_len
             = -1                                   l > max_len

    times ``factor``. ``max_len`` is L_max, ``buffer`` is L_cache.
    """
    if not 0 < buffer <= max_len:
        raise ValueError(f"need 0 < buffer <= max_len, got buffer={buffer}, max_len={max_len}")
    l = torch.as_tensor(lengths, dtype=torch.float32)
    start = max_len - buffer
    pen = ((start - l) / buffer).clamp(max=0.0)
    pen = torch.where(l > max_len, torch.full_like(pen, -1.0), pen)
    return pen * factor
