"""Metrics: `record_metric` from anywhere, reduced per step, written to console/JSONL/TB/W&B."""

from forge.observability.loggers import (
    ConsoleBackend,
    JsonlBackend,
    MetricLogger,
    TensorBoardBackend,
    WandbBackend,
    build_backends,
    truncate_jsonl,
)
from forge.observability.metrics import MetricRecord, Reduce, drain, record_metric, reduce_records

__all__ = [
    "ConsoleBackend",
    "JsonlBackend",
    "MetricLogger",
    "MetricRecord",
    "Reduce",
    "TensorBoardBackend",
    "WandbBackend",
    "build_backends",
    "drain",
    "record_metric",
    "reduce_records",
    "truncate_jsonl",
]


_TORCHFORGE = ("get_or_create_metric_logger", "Tracer", "trace")  # defined in forge.compat


def __getattr__(name: str):
    if name in _TORCHFORGE:
        import forge.compat

        return getattr(forge.compat, name)
    raise AttributeError(f"module 'forge.observability' has no attribute '{name}'")
