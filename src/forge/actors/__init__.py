"""The services of an RL loop. Imported lazily so `import forge.actors` stays cheap."""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "Generator": "forge.actors.generator",
    "Trainer": "forge.actors.trainer",
    "ReferenceModel": "forge.actors.reference_model",
    "ReplayBuffer": "forge.actors.replay_buffer",
    "RewardActor": "forge.actors.reward",
    "ComputeAdvantages": "forge.actors.advantages",
    "DatasetActor": "forge.actors.dataset",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'forge.actors' has no attribute '{name}'")
