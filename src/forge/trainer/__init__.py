"""The training engine behind the RL `Trainer` actor and the SFT app (no actor runtime here)."""

from forge.trainer.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune,
    resume_latest,
    save_checkpoint,
    validate_checkpoint,
)
from forge.trainer.config import (
    CheckpointConfig,
    LRSchedulerConfig,
    OptimizerConfig,
    ParallelismConfig,
    TrainerConfig,
    TrainingConfig,
)
from forge.trainer.step import SFTLoss, sft_loss

__all__ = [
    "CheckpointConfig",
    "CheckpointError",
    "CheckpointMismatchError",
    "LRSchedulerConfig",
    "OptimizerConfig",
    "ParallelismConfig",
    "SFTLoss",
    "TrainEngine",
    "TrainerConfig",
    "TrainingConfig",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "prune",
    "resume_latest",
    "save_checkpoint",
    "sft_loss",
    "validate_checkpoint",
]


def __getattr__(name: str):
    if name == "TrainEngine":  # heavy imports (models, losses) only when used
        from forge.trainer.engine import TrainEngine

        return TrainEngine
    raise AttributeError(f"module 'forge.trainer' has no attribute '{name}'")
