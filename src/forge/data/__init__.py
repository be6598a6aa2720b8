"""Data: datasets, built-in tasks, rewards, answer formats, collation.

Submodules are imported on first use so `import forge.data` stays cheap (HF `datasets` and
math-verify load only when needed): `forge.data.PromptDataset`, `forge.data.get_task`, ...
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "DatasetConfig": "forge.data.datasets",
    "DatasetError": "forge.data.datasets",
    "PromptDataset": "forge.data.datasets",
    "load_local": "forge.data.sources",
    "extract_answer": "forge.data.formats",
    "extract_boxed": "forge.data.formats",
    "extract_gsm8k": "forge.data.formats",
    "get_task": "forge.data.tasks",
    "build_rewards": "forge.data.rewards",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'forge.data' has no attribute '{name}'")
