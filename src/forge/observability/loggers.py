"""Logger backends and the controller-side `MetricLogger` that flushes once per step."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Protocol

from forge.observability.metrics import drain, reduce_records


class LoggerBackend(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class ConsoleBackend:
    """A compact table of the step's metrics every `every` steps, under a run progress bar."""

    def __init__(self, total_steps: int | None = None, every: int = 1, keys: list[str] | None = None, desc: str = "train"):
        from tqdm.auto import tqdm

        self.every, self.keys = max(1, every), keys
        self.bar = tqdm(total=total_steps, desc=desc, unit="step", dynamic_ncols=True, leave=True)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.bar.update(1)
        if step % self.every:
            return
        keys = [k for k in (self.keys or sorted(metrics)) if k in metrics]
        cells = [f"{k}={_fmt(metrics[k])}" for k in keys]
        lines, line = [], f"step {step:>5} |"
        for c in cells:
            if len(line) + len(c) > 118:
                lines.append(line)
                line = " " * 11 + "|"
            line += " " + c
        lines.append(line)
        self.bar.write("\n".join(lines))

    def close(self) -> None:
        self.bar.close()


def _fmt(v: float) -> str:
    if v == 0 or (1e-3 <= abs(v) < 1e5):
        return f"{v:.4g}"
    return f"{v:.3e}"


class JsonlBackend:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.path, "a", buffering=1)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.f.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")

    def close(self) -> None:
        self.f.close()


class TensorBoardBackend:
    def __init__(self, log_dir: str | os.PathLike):
        from torch.utils.tensorboard import SummaryWriter

        self.w = SummaryWriter(log_dir=str(log_dir))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.w.add_scalar(k, v, step)
        self.w.flush()

    def close(self) -> None:
        self.w.close()


class WandbBackend:
    def __init__(self, project: str, config: dict[str, Any] | None = None, **kwargs: Any):
        try:
            import wandb
        except ImportError as e:
            raise ImportError("the wandb logger needs the wandb package: pip install 'forge[wandb]'") from e
        self.run = wandb.init(project=project, config=config, **kwargs)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class MetricLogger:
    """Drains every process's records at the end of a step and writes them to all backends."""

    def __init__(self, backends: list[LoggerBackend]):
        self.backends = backends
        self.history: list[dict[str, float]] = []

    async def flush(self, step: int, extra: dict[str, float] | None = None) -> dict[str, float]:
        """End of a step: this process's records plus every remote proc's (through the provisioner)."""
        from forge.controller.provisioner import get_provisioner

        return self._write(drain() + await get_provisioner().collect_metrics(), step, extra)

    def flush_local(self, step: int, extra: dict[str, float] | None = None) -> dict[str, float]:
        """End of a step for a single-process program (no services): this process's records only."""
        return self._write(drain(), step, extra)

    def _write(self, records: list, step: int, extra: dict[str, float] | None) -> dict[str, float]:
        metrics = reduce_records(records)
        if extra:
            metrics.update(extra)
        self.history.append({"step": step, **metrics})
        for b in self.backends:
            b.log(metrics, step)
        return metrics

    def close(self) -> None:
        for b in self.backends:
            b.close()


def build_backends(spec: dict[str, dict[str, Any]], total_steps: int | None, run_dir: str | os.PathLike) -> list[LoggerBackend]:
    """`spec` is the config's `metric_logging` block: {console: {...}, jsonl: {...}, tensorboard: {...}, wandb: {...}}."""
    out: list[LoggerBackend] = []
    run_dir = Path(run_dir)
    for name, opts in spec.items():
        opts = dict(opts or {})
        if opts.pop("enabled", True) is False:
            continue
        if name == "console":
            out.append(ConsoleBackend(total_steps=total_steps, **opts))
        elif name == "jsonl":
            out.append(JsonlBackend(opts.get("path", run_dir / "metrics.jsonl")))
        elif name == "tensorboard":
            out.append(TensorBoardBackend(opts.get("log_dir", run_dir / "tb")))
        elif name == "wandb":
            out.append(WandbBackend(**opts))
        else:
            raise ValueError(
                f"metric_logging.{name}: unknown logger backend; expected console, jsonl, tensorboard or wandb"
            )
    return out
