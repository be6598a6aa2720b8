"""torchforge's `forge.data_models.episode` (see forge.compat)."""

from forge.compat import Episode, Group

__all__ = ["Episode", "Group"]
