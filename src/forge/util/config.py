"""torchforge's `forge.util.config.parse` (see forge.compat)."""

from forge.compat import parse

__all__ = ["parse"]
