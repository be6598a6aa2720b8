"""`record_metric` — callable from any actor, in any process — and per-step reduction.

Each process keeps its records in a buffer; the controller-side `MetricLogger` drains the
local buffer and, through the remote source, the buffers of remote procs, then reduces every
key over all records of the step with the key's `Reduce`. The remote source is set by
`forge.controller` when it is imported (the controller knows the procs; observability sits
below it and never imports it): a program without a controller has no remote procs.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from enum import Enum

import torch


class Reduce(str, Enum):
    MEAN = "mean"
    SUM = "sum"
    MAX = "max"
    MIN = "min"
    STD = "std"


@dataclass(frozen=True)
class MetricRecord:
    key: str
    value: float
    reduce: Reduce


log = logging.getLogger(__name__)
_lock = threading.Lock()
# Library code records metrics whether or not a MetricLogger drains them (a notebook driving a
# Trainer by hand): past this many undrained records the oldest go, with one warning.
MAX_UNDRAINED_RECORDS = 1_000_000
_buffer: deque[MetricRecord] = deque(maxlen=MAX_UNDRAINED_RECORDS)
_warned_full = False


def record_metric(key: str, value: float | int | torch.Tensor, reduce: Reduce | str = Reduce.MEAN) -> None:
    """Record one value of `key` in this process; reduced with `reduce` at the next flush."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"record_metric: key must be a non-empty string, got {key!r}")
    try:
        red = Reduce(reduce)
    except ValueError:
        raise ValueError(
            f"record_metric('{key}'): reduce must be one of {[r.value for r in Reduce]}, got {reduce!r}"
        ) from None
    try:
        if isinstance(value, torch.Tensor):
            value = value.detach().float().item()  # a one-element tensor only
        value = float(value)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"record_metric('{key}'): value must be a number or a one-element tensor: {e}") from None
    global _warned_full
    with _lock:
        if len(_buffer) == _buffer.maxlen and not _warned_full:
            _warned_full = True
            log.warning("%d metric records were never drained (no MetricLogger flushes this process); "
                        "dropping the oldest from now on", _buffer.maxlen)
        _buffer.append(MetricRecord(key, value, red))


def drain() -> list[MetricRecord]:
    """Take every record of this process since the last drain."""
    with _lock:
        out = list(_buffer)
        _buffer.clear()
    return out


RemoteSource = Callable[[], Awaitable[list[MetricRecord]]]
_remote_source: RemoteSource | None = None


def set_remote_source(source: RemoteSource | None) -> None:
    """Where `collect_remote` gets other processes' records (`forge.controller` sets its provisioner's)."""
    global _remote_source
    _remote_source = source


async def collect_remote() -> list[MetricRecord]:
    """Every remote proc's records since their last drain (none without a remote source)."""
    return await _remote_source() if _remote_source is not None else []


def reduce_records(records: Iterable[MetricRecord]) -> dict[str, float]:
    grouped: dict[str, tuple[Reduce, list[float]]] = {}
    for r in records:
        red, vals = grouped.setdefault(r.key, (r.reduce, []))
        if red != r.reduce:
            raise ValueError(f"metric '{r.key}' recorded with both {red.value} and {r.reduce.value}")
        vals.append(r.value)
    out: dict[str, float] = {}
    for key, (red, vals) in grouped.items():
        finite = [v for v in vals if math.isfinite(v)] or vals
        if red is Reduce.MEAN:
            out[key] = sum(finite) / len(finite)
        elif red is Reduce.SUM:
            out[key] = sum(finite)
        elif red is Reduce.MAX:
            out[key] = max(finite)
        elif red is Reduce.MIN:
            out[key] = min(finite)
        else:
            m = sum(finite) / len(finite)
            out[key] = math.sqrt(sum((v - m) ** 2 for v in finite) / len(finite))
    return out
