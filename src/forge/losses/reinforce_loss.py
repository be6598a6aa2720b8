"""torchforge import path: `from forge.losses.reinforce_loss import ReinforceLoss`."""

from forge.losses.reinforce import ReinforceLoss

__all__ = ["ReinforceLoss"]
