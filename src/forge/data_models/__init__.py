"""torchforge's `forge.data_models`: aliases of forge.types (see forge.compat)."""

from forge.compat import Completion, Episode, Group

__all__ = ["Completion", "Episode", "Group"]
