"""Logger backends and the controller-side `MetricLogger` that flushes once per step."""

from __future__ import annotations

import json
import logging
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


log = logging.getLogger(__name__)


def truncate_jsonl(path: str | os.PathLike, last_step: int) -> list[dict[str, Any]]:
    """Keep the rows of `path` with `step <= last_step` (a resumed run redoes the later steps, so
    their old rows would be duplicates); returns the rows kept. The file is rewritten atomically; a
    line a crash cut short is dropped with a warning. A missing file is no rows."""
    path = Path(path)
    if not path.is_file():
        return []
    kept_lines, rows = [], []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = int(row["step"])
        except (ValueError, KeyError, TypeError):
            log.warning("%s line %d is not a JSON row with a step (cut short by a crash?); dropped", path, i + 1)
            continue
        if step <= last_step:
            kept_lines.append(line)
            rows.append(row)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(x + "\n" for x in kept_lines))
    os.replace(tmp, path)
    return rows


class JsonlBackend:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.path, "a", buffering=1)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.f.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")

    def rewind(self, last_step: int) -> list[dict[str, Any]]:
        """Drop the rows after `last_step` (resume); returns the rows kept."""
        self.f.close()
        rows = truncate_jsonl(self.path, last_step)
        self.f = open(self.path, "a", buffering=1)
        return rows

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

    def rewind(self, last_step: int) -> None:
        """A run resumed at `last_step`: drop the rows of later steps from the backends that keep
        rows (JSONL), and take the rows kept into `history`, so that the history (and the learning
        curve drawn from it) covers the whole run, not only the resumed part. Console, TensorBoard
        and W&B cannot take back what they showed: the redone steps appear there again (TensorBoard
        plots both points of a step; a resumed W&B run is a new run)."""
        kept: list[dict[str, float]] | None = None
        for b in self.backends:
            rewind = getattr(b, "rewind", None)
            if rewind is not None:
                kept = [{k: v for k, v in row.items() if k != "time"} for row in rewind(last_step)]
        self.history = kept if kept is not None else [h for h in self.history if h["step"] <= last_step]

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
