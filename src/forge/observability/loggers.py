"""Logger backends and the controller-side `MetricLogger` that flushes once per step."""

from __future__ import annotations

import difflib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from forge.config.errors import ConfigError
from forge.config.schema import build
from forge.observability.metrics import collect_remote, drain, reduce_records


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
        # the bar shows the step reached, not rows logged: the apps log an evaluation row before step 1
        # and after the last step, and a resumed run starts past 0
        reached = min(step, self.bar.total) if self.bar.total else step
        if reached > self.bar.n:
            self.bar.update(reached - self.bar.n)
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


# forge's metric -> torchforge's name for the same quantity; both are logged, so a torchforge
# dashboard keeps working (one table: add a pair here, nowhere else)
TORCHFORGE_METRIC_NAMES: dict[str, str] = {
    "rl_trainer/lr": "rl_trainer/learning_rate",
    "loss/kl_ref": "rl_trainer/step/avg_kl_divergence",
    "generator/num_requests": "generator/generate/count_requests",
    "dataset/epoch": "dataset/sample/current_epoch",
    "reward/total/mean": "reward/evaluate_response/avg_total_reward",
    "rl_trainer/step_time_s": "rl_trainer_perf/step/total_duration_avg_s",
    "time/generate_s": "main_perf/continuous_rollouts/policy_generation/duration_avg_s",
    "time/reward_s": "main_perf/continuous_rollouts/reward_evaluation/duration_avg_s",
    "time/ref_s": "main_perf/continuous_rollouts/reference_model_calculate_logprobs/duration_avg_s",
    "time/wait_for_batch_s": "main_perf/continuous_training/waiting_for_buffer/duration_avg_s",
    "time/train_s": "main_perf/continuous_training/train_step/duration_avg_s",
    "time/weight_sync_s": "main_perf/continuous_training/push_weights/duration_avg_s",
    "time/step_s": "main_perf/continuous_training/total_duration_avg_s",
}
_NOT_A_REWARD = {"total", "count", "errors", "timeouts"}


def torchforge_names(metrics: dict[str, float]) -> dict[str, float]:
    """torchforge's names for the metrics it also logs: the table above, plus each reward's mean
    as `reward/evaluate_response/avg_<Fn>_reward` (`math` -> MathReward, as torchforge names its
    reward classes)."""
    out = {tf: metrics[k] for k, tf in TORCHFORGE_METRIC_NAMES.items() if k in metrics and tf not in metrics}
    for k, v in metrics.items():
        parts = k.split("/")
        if len(parts) == 3 and parts[0] == "reward" and parts[2] == "mean" and parts[1] not in _NOT_A_REWARD:
            name = "".join(w.capitalize() for w in parts[1].split("_"))
            name = name if name.lower().endswith("reward") else f"{name}Reward"
            out.setdefault(f"reward/evaluate_response/avg_{name}_reward", v)
    return out


class MetricLogger:
    """Drains every process's records at the end of a step and writes them to all backends."""

    def __init__(self, backends: list[LoggerBackend]):
        self.backends = backends
        self.history: list[dict[str, float]] = []

    async def flush(self, step: int, extra: dict[str, float] | None = None) -> dict[str, float]:
        """End of a step: this process's records plus every remote proc's (`collect_remote`: the
        controller's provisioner, once `forge.controller` is imported)."""
        return self._write(drain() + await collect_remote(), step, extra)

    def flush_local(self, step: int, extra: dict[str, float] | None = None) -> dict[str, float]:
        """End of a step for a single-process program (no services): this process's records only."""
        return self._write(drain(), step, extra)

    def _write(self, records: list, step: int, extra: dict[str, float] | None) -> dict[str, float]:
        metrics = reduce_records(records)
        if extra:
            metrics.update(extra)
        metrics.update(torchforge_names(metrics))
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


# ---------------------------------------------------------------- the `metric_logging` schema
# torchforge's keys (logging_mode, per_rank_share_run, project/group) sit beside forge's own:
# a torchforge config's metric_logging block is valid as written.
LOGGING_MODES = ("global_reduce", "per_rank_reduce", "per_rank_no_reduce")


@dataclass
class BackendSpec:
    enabled: bool = True
    # torchforge: global_reduce (one value per key per step, reduced over every rank: what
    # forge's MetricLogger does), per_rank_reduce / per_rank_no_reduce (one stream per rank)
    logging_mode: str = "global_reduce"
    per_rank_share_run: bool = False  # torchforge: per-rank streams share one W&B run
    reduce_across_ranks: bool | None = None  # torchforge's older name for global_reduce

    def __post_init__(self) -> None:
        if self.logging_mode not in LOGGING_MODES:
            raise ConfigError(f"logging_mode must be one of {list(LOGGING_MODES)}, got {self.logging_mode!r}")
        if self.logging_mode != "global_reduce" or self.reduce_across_ranks is False:
            raise ConfigError(
                f"logging_mode {self.logging_mode!r} (or reduce_across_ranks: false) asks for one metric stream per "
                "rank; forge reduces every rank's records on the controller once per step (torchforge's "
                "'global_reduce', the mode of its shipped configs): set logging_mode: global_reduce")


@dataclass
class ConsoleSpec(BackendSpec):
    every: int = 1
    keys: list[str] | None = None
    desc: str = "train"


@dataclass
class JsonlSpec(BackendSpec):
    path: str | None = None  # default: <run_dir>/metrics.jsonl


@dataclass
class TensorBoardSpec(BackendSpec):
    log_dir: str | None = None  # default: <run_dir>/tb


@dataclass
class WandbSpec(BackendSpec):
    project: str = "forge"
    group: str | None = None
    name: str | None = None
    entity: str | None = None
    tags: list[str] | None = None
    notes: str | None = None
    mode: str | None = None  # online | offline | disabled
    dir: str | None = None


BACKEND_SPECS: dict[str, type[BackendSpec]] = {
    "console": ConsoleSpec, "jsonl": JsonlSpec, "tensorboard": TensorBoardSpec, "wandb": WandbSpec,
}


def validate_metric_logging(spec: dict[str, Any] | None, path: str = "metric_logging") -> dict[str, BackendSpec]:
    """The typed `metric_logging` block; an unknown backend or key fails naming it and the closest valid one."""
    if spec is None:
        return {}
    if not isinstance(spec, dict):
        raise ConfigError(f"'{path}' must be a mapping of backend name -> options, got {type(spec).__name__}")
    out: dict[str, BackendSpec] = {}
    for name, opts in spec.items():
        if isinstance(opts, BackendSpec):
            out[name] = opts
            continue
        cls = BACKEND_SPECS.get(str(name))
        if cls is None:
            close = difflib.get_close_matches(str(name), list(BACKEND_SPECS), n=1)
            hint = f" — did you mean '{path}.{close[0]}'?" if close else ""
            raise ConfigError(f"{path}.{name}: unknown logger backend{hint} (expected one of {', '.join(BACKEND_SPECS)})")
        try:
            out[name] = build(cls, opts, path=f"{path}.{name}")
        except ConfigError as e:
            msg = str(e)
            raise ConfigError(msg if msg.startswith(("unknown key", "missing", "'")) else f"{path}.{name}: {msg}") from None
    return out


def build_backends(spec: dict[str, Any], total_steps: int | None, run_dir: str | os.PathLike) -> list[LoggerBackend]:
    """`spec` is the config's `metric_logging` block: {console: {...}, jsonl: {...}, tensorboard: {...}, wandb: {...}}."""
    out: list[LoggerBackend] = []
    run_dir = Path(run_dir)
    for _name, opts in validate_metric_logging(spec).items():
        if not opts.enabled:
            continue
        if isinstance(opts, ConsoleSpec):
            out.append(ConsoleBackend(total_steps=total_steps, every=opts.every, keys=opts.keys, desc=opts.desc))
        elif isinstance(opts, JsonlSpec):
            out.append(JsonlBackend(opts.path or run_dir / "metrics.jsonl"))
        elif isinstance(opts, TensorBoardSpec):
            out.append(TensorBoardBackend(opts.log_dir or run_dir / "tb"))
        elif isinstance(opts, WandbSpec):
            kw = {k: getattr(opts, k) for k in ("group", "name", "entity", "tags", "notes", "mode", "dir")
                  if getattr(opts, k) is not None}
            out.append(WandbBackend(project=opts.project, **kw))
    return out
