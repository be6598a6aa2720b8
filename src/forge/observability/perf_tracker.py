"""`Tracer` / `trace`: durations through `record_metric` (torchforge's
`forge.observability.perf_tracker`; `forge.compat` re-exports them)."""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable
from typing import Any

import torch

from forge.observability.metrics import Reduce, record_metric


class Tracer:
    """torchforge's perf tracer: `t = Tracer("trainer_perf/step"); t.start(); ...; t.step("fwd");
    ...; t.stop()` records `<prefix>/<step>/duration_avg_s` (and `_max_s`) and
    `<prefix>/total_duration_avg_s` through `record_metric`. `timer="gpu"` synchronises CUDA
    before reading the clock."""

    def __init__(self, prefix: str, track_memory: bool = False, timer: str = "cpu"):
        if timer not in ("cpu", "gpu"):
            raise ValueError(f"Tracer timer must be 'cpu' or 'gpu', got {timer!r}")
        self.prefix, self.timer = prefix, timer
        self.t0: float | None = None
        self.last: float | None = None

    def _now(self) -> float:
        if self.timer == "gpu" and torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def start(self) -> None:
        self.t0 = self.last = self._now()

    def step(self, name: str) -> None:
        if self.last is None:
            raise RuntimeError(f"Tracer('{self.prefix}').step('{name}') before start()")
        now = self._now()
        record_metric(f"{self.prefix}/{name}/duration_avg_s", now - self.last, Reduce.MEAN)
        record_metric(f"{self.prefix}/{name}/duration_max_s", now - self.last, Reduce.MAX)
        self.last = now

    def stop(self) -> None:
        if self.t0 is None:
            raise RuntimeError(f"Tracer('{self.prefix}').stop() before start()")
        dt = self._now() - self.t0
        record_metric(f"{self.prefix}/total_duration_avg_s", dt, Reduce.MEAN)
        record_metric(f"{self.prefix}/total_duration_max_s", dt, Reduce.MAX)
        self.t0 = self.last = None


def trace(prefix: str, track_memory: bool = False, timer: str = "cpu") -> Callable[[Callable], Callable]:
    """Decorator: the function's duration as `<prefix>/total_duration_avg_s` (sync or async)."""

    def wrap(fn: Callable) -> Callable:
        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def run_async(*a: Any, **k: Any) -> Any:
                t = Tracer(prefix, track_memory, timer)
                t.start()
                try:
                    return await fn(*a, **k)
                finally:
                    t.stop()

            return run_async

        @functools.wraps(fn)
        def run(*a: Any, **k: Any) -> Any:
            t = Tracer(prefix, track_memory, timer)
            t.start()
            try:
                return fn(*a, **k)
            finally:
                t.stop()

        return run

    return wrap


__all__ = ["Tracer", "trace"]
