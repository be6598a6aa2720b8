"""torchforge's `forge.util` (see forge.compat)."""
