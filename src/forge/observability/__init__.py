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
from forge.observability.metric_actors import get_or_create_metric_logger
from forge.observability.metrics import (
    MetricRecord,
    Reduce,
    collect_remote,
    drain,
    record_metric,
    reduce_records,
    set_remote_source,
)
from forge.observability.perf_tracker import Tracer, trace

__all__ = [
    "ConsoleBackend",
    "JsonlBackend",
    "MetricLogger",
    "MetricRecord",
    "Reduce",
    "TensorBoardBackend",
    "Tracer",
    "WandbBackend",
    "build_backends",
    "collect_remote",
    "drain",
    "get_or_create_metric_logger",
    "record_metric",
    "reduce_records",
    "set_remote_source",
    "trace",
    "truncate_jsonl",
]
