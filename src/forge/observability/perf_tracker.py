"""torchforge's `forge.observability.perf_tracker` (see forge.compat)."""

from forge.compat import Tracer, trace

__all__ = ["Tracer", "trace"]
