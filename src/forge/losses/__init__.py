"""Policy losses for RL post-training: one file per loss, shared helpers in `common`.

Every loss is an ``nn.Module`` with ``forward(logprobs, ref_logprobs, advantages, padding_mask,
*, generator_logprobs=None, old_logprobs=None, entropy=None) -> scalar`` and attributes
``needs_ref`` / ``needs_old_logprobs``. Each registers itself (``forge.config.registry``, kind
``"loss"``) under a short name and its class name; build one from config with :func:`build_loss`.
"""

from forge.losses.build import build_loss
from forge.losses.cispo import CISPOLoss
from forge.losses.clip_cov import ClipCovLoss
from forge.losses.common import AGG_MODES, KL_ESTIMATORS, PolicyLoss, aggregate, kl_penalty, masked_mean
from forge.losses.dapo import DAPOLoss, overlong_penalty
from forge.losses.gmpo import GMPOLoss
from forge.losses.gpg import GPGLoss
from forge.losses.grpo import GRPOLoss
from forge.losses.gspo import GSPOLoss
from forge.losses.kl_cov import KLCovLoss
from forge.losses.reinforce import ReinforceLoss
from forge.losses.sapo import SAPOLoss
from forge.losses.simple_grpo import SimpleGRPOLoss

__all__ = [
    "AGG_MODES", "KL_ESTIMATORS", "CISPOLoss", "ClipCovLoss", "DAPOLoss", "GMPOLoss",
    "GPGLoss", "GRPOLoss", "GSPOLoss", "KLCovLoss", "PolicyLoss", "ReinforceLoss", "SAPOLoss",
    "SimpleGRPOLoss", "aggregate", "build_loss", "kl_penalty", "masked_mean", "overlong_penalty",
]
