"""torchforge import path: `from forge.losses.grpo_loss import SimpleGRPOLoss`."""

from forge.losses.simple_grpo import SimpleGRPOLoss

__all__ = ["SimpleGRPOLoss"]
