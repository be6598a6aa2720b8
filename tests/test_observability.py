"""forge.observability: reductions, the controller-side MetricLogger and its backends."""

from __future__ import annotations

import asyncio
import builtins
import json
import math
import random
import statistics
import sys
from pathlib import Path

import pytest
import torch

from forge.controller import init_provisioner, shutdown
from forge.observability import (
    ConsoleBackend,
    JsonlBackend,
    MetricLogger,
    MetricRecord,
    Reduce,
    TensorBoardBackend,
    WandbBackend,
    build_backends,
    drain,
    record_metric,
    reduce_records,
)


@pytest.fixture(autouse=True)
def _empty_buffer() -> None:
    drain()


def test_reductions() -> None:
    vals = [3.0, 1.0, 4.0, 1.0, 5.0]
    for v in vals:
        for red in Reduce:
            record_metric(f"x/{red.value}", v, red)
    out = reduce_records(drain())
    assert out["x/mean"] == pytest.approx(statistics.mean(vals))
    assert out["x/sum"] == 14.0
    assert out["x/max"] == 5.0 and out["x/min"] == 1.0
    assert out["x/std"] == pytest.approx(statistics.pstdev(vals))
    assert drain() == []  # drained


def test_tensor_values_strings_and_nonfinite() -> None:
    record_metric("t", torch.tensor(2.5, requires_grad=True), "sum")
    record_metric("t", torch.tensor([1.5]), Reduce.SUM)
    record_metric("nan", float("nan"))
    record_metric("nan", 2.0)
    record_metric("allnan", float("nan"))
    out = reduce_records(drain())
    assert out["t"] == 4.0
    assert out["nan"] == 2.0  # a non-finite value does not poison a finite mean
    assert math.isnan(out["allnan"])


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match=r"record_metric\('loss'\): reduce must be one of"):
        record_metric("loss", 1.0, "avg")
    with pytest.raises(ValueError, match=r"record_metric\('loss'\): value must be a number"):
        record_metric("loss", torch.ones(3))
    with pytest.raises(ValueError, match=r"record_metric\('loss'\): value must be a number"):
        record_metric("loss", "high")
    with pytest.raises(ValueError, match="non-empty string"):
        record_metric("", 1.0)
    with pytest.raises(ValueError, match="recorded with both mean and sum"):
        reduce_records([MetricRecord("k", 1.0, Reduce.MEAN), MetricRecord("k", 1.0, Reduce.SUM)])


class _Capture:
    def __init__(self) -> None:
        self.logged: list[tuple[int, dict[str, float]]] = []
        self.closed = False

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.logged.append((step, dict(metrics)))

    def close(self) -> None:
        self.closed = True


def test_metric_logger_flushes_per_step() -> None:
    async def main() -> None:
        init_provisioner("local")
        cap = _Capture()
        logger = MetricLogger([cap])
        record_metric("loss", 2.0)
        record_metric("loss", 4.0)
        m1 = await logger.flush(1, extra={"lr": 0.1})
        record_metric("loss", 10.0)
        m2 = await logger.flush(2)
        assert m1 == {"loss": 3.0, "lr": 0.1} and m2 == {"loss": 10.0}
        assert cap.logged == [(1, m1), (2, m2)]
        assert logger.history == [{"step": 1, **m1}, {"step": 2, **m2}]
        logger.close()
        assert cap.closed
        await shutdown()

    asyncio.run(main())


def test_jsonl_and_console_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "sub" / "metrics.jsonl"
    j = JsonlBackend(path)
    j.log({"loss": 1.5, "reward/mean": 0.25}, step=1)
    j.log({"loss": 1.0}, step=2)
    j.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.5), (2, 1.0)]
    assert rows[0]["reward/mean"] == 0.25 and "time" in rows[0]

    c = ConsoleBackend(total_steps=2, keys=["loss", "reward/mean"])
    c.log({"eval/accuracy": 0.5}, step=0)  # the apps' evaluation rows before step 1 and after the last
    assert c.bar.n == 0
    c.log({"loss": 1.5, "reward/mean": 0.25, "hidden": 9.0}, step=1)
    c.log({"loss": 1e-7}, step=2)
    c.log({"eval/accuracy": 0.6}, step=3)
    assert c.bar.n == 2  # the bar counts steps, never past its total
    c.close()
    out = capsys.readouterr()
    text = out.out + out.err
    assert "step     1 | loss=1.5 reward/mean=0.25" in text
    assert "hidden" not in text  # only the chosen keys
    assert "loss=1.000e-07" in text


def test_tensorboard_writes_readable_events(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = TensorBoardBackend(tmp_path / "tb")
    for step in range(3):
        tb.log({"loss": 1.0 / (step + 1)}, step)
    tb.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    events = acc.Scalars("loss")
    assert [(e.step, round(e.value, 4)) for e in events] == [(0, 1.0), (1, 0.5), (2, 0.3333)]


def test_build_backends(tmp_path: Path) -> None:
    spec = {"console": {"enabled": False}, "jsonl": {}, "tensorboard": {"log_dir": str(tmp_path / "tbx")}}
    backends = build_backends(spec, total_steps=3, run_dir=tmp_path)
    assert [type(b) for b in backends] == [JsonlBackend, TensorBoardBackend]
    for b in backends:
        b.log({"a": 1.0}, 0)
        b.close()
    assert (tmp_path / "metrics.jsonl").is_file() and any((tmp_path / "tbx").iterdir())
    with pytest.raises(ValueError, match=r"metric_logging\.mlflow: unknown logger backend"):
        build_backends({"mlflow": {}}, 1, tmp_path)


def test_wandb_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_wandb(name: str, *a: object, **k: object) -> object:
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *a, **k)

    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(ImportError, match=r"pip install 'forge\[wandb\]'"):
        WandbBackend(project="p")
    with pytest.raises(ImportError, match=r"pip install 'forge\[wandb\]'"):
        build_backends({"wandb": {"project": "p"}}, 1, ".")


def test_rewind_drops_redone_steps_and_keeps_the_history(tmp_path):
    """Resume at step k: rows of later steps (they run again) leave metrics.jsonl, rows up to k stay
    and become the logger's history (the learning curve covers the whole run); a row a crash cut
    short is dropped (issue 29 item 7)."""
    import json
    import random

    from forge.observability import JsonlBackend, MetricLogger

    path = tmp_path / "metrics.jsonl"
    vals = [random.random() for _ in range(7)]
    first = MetricLogger([JsonlBackend(path)])
    for step, v in enumerate(vals):
        first.flush_local(step, extra={"loss": v})
    first.close()
    with open(path, "a") as f:
        f.write('{"step": 7, "loss": 0.')  # the crash
    k = random.randint(1, 5)
    resumed = MetricLogger([JsonlBackend(path)])
    resumed.rewind(k)
    assert [(h["step"], h["loss"]) for h in resumed.history] == list(enumerate(vals[: k + 1]))
    resumed.flush_local(k + 1, extra={"loss": -1.0})
    resumed.close()
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(k + 2)) and rows[-1]["loss"] == -1.0
    assert [h["step"] for h in resumed.history] == list(range(k + 2))


def test_undrained_metric_records_are_bounded(monkeypatch, caplog):
    """A process that records but never flushes keeps at most MAX_UNDRAINED_RECORDS, oldest dropped."""
    from collections import deque

    from forge.observability import metrics

    monkeypatch.setattr(metrics, "_buffer", deque(maxlen=50))
    monkeypatch.setattr(metrics, "_warned_full", False)
    values = [random.random() for _ in range(120)]
    with caplog.at_level("WARNING"):
        for v in values:
            metrics.record_metric("x", v)
    kept = metrics.drain()
    assert [r.value for r in kept] == values[-50:]
    assert sum("never drained" in r.message for r in caplog.records) == 1
    assert metrics.drain() == []
