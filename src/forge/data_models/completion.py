"""torchforge's `forge.data_models.completion` (see forge.compat)."""

from forge.compat import Completion

__all__ = ["Completion"]
