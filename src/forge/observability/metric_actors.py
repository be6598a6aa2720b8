"""torchforge's `forge.observability.metric_actors` (see forge.compat)."""

from forge.compat import get_or_create_metric_logger

__all__ = ["get_or_create_metric_logger"]
