"""torchforge's global metric logger (`forge.observability.metric_actors.get_or_create_metric_logger`)
over forge's controller-side `MetricLogger`; `forge.compat` re-exports it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from forge.observability.loggers import MetricLogger, build_backends


class _Endpoint:
    """`.call_one(...)` / `.call(...)` on a controller-side object, as on an actor handle."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn

    async def call_one(self, *args: Any, **kwargs: Any) -> Any:
        out = self.fn(*args, **kwargs)
        return await out if hasattr(out, "__await__") else out

    async def call(self, *args: Any, **kwargs: Any) -> Any:
        return await self.call_one(*args, **kwargs)


class _GlobalLogger:
    """torchforge's global logger actor, over forge's controller-side `MetricLogger`:
    `init_backends.call_one(cfg)`, `flush.call_one(step)`, `shutdown.call_one()`."""

    def __init__(self, run_dir: str = "outputs/metrics"):
        self.run_dir = run_dir
        self.logger: MetricLogger | None = None
        self.init_backends = _Endpoint(self._init_backends)
        self.flush = _Endpoint(self._flush)
        self.shutdown = _Endpoint(self._shutdown)

    def _init_backends(self, config: dict[str, Any]) -> None:
        self.logger = MetricLogger(build_backends(dict(config), total_steps=None, run_dir=self.run_dir))

    async def _flush(self, global_step: int) -> dict[str, float]:
        if self.logger is None:
            raise RuntimeError("flush before init_backends: call `await mlogger.init_backends.call_one(cfg)` first")
        return await self.logger.flush(global_step)

    def _shutdown(self) -> None:
        if self.logger is not None:
            self.logger.close()
            self.logger = None


_GLOBAL_LOGGER: _GlobalLogger | None = None


async def get_or_create_metric_logger(proc_mesh: Any = None, process_name: str | None = None) -> _GlobalLogger:
    """The one controller-side metric logger (every process's `record_metric` reaches it)."""
    global _GLOBAL_LOGGER
    if _GLOBAL_LOGGER is None:
        _GLOBAL_LOGGER = _GlobalLogger()
    return _GLOBAL_LOGGER


__all__ = ["get_or_create_metric_logger"]
