"""DCP checkpoints: exact resume, truncation detected and skipped, interrupted saves, keep_last_n, HF export."""

from __future__ import annotations

import json
import logging
import random

import numpy as np
import pytest
import torch

from forge.trainer import CheckpointError, latest_checkpoint, list_checkpoints, validate_checkpoint
from forge.trainer.engine import TrainEngine
from forge.trainer.testing import random_rl_batch


def make(tmp_path, **ck) -> TrainEngine:
    return TrainEngine({"model": {"tiny": "qwen2", "seed": 0}, "loss": {"name": "grpo", "beta": 0.0},
                        "optimizer": {"lr": 1e-3}, "lr_scheduler": {"warmup_steps": 3},
                        "training": {"max_tokens_per_microbatch": 20},
                        "checkpoint": {"dir": str(tmp_path / "ck"), **ck}})


def batches(n: int, seed: int):
    return [random_rl_batch(batch=4, seed=seed + i) for i in range(n)]


def test_resume_gives_the_identical_next_loss(tmp_path):
    seed = int(torch.randint(0, 10_000, (1,)))
    data = batches(3, seed)
    a = make(tmp_path)
    a.train_step(*data[0])
    a.train_step(*data[1])
    a.save(extra={"data_pos": 2})
    rng_draw = (torch.rand(3), random.random(), np.random.rand())
    expected = a.train_step(*data[2])
    del a
    torch.manual_seed(123)  # the resumed run must restore RNG, not inherit this
    b = make(tmp_path)
    info = b.load()
    assert info["step"] == 2 and info["extra"] == {"data_pos": 2} and b.step == 2
    assert torch.equal(torch.rand(3), rng_draw[0]) and random.random() == rng_draw[1] and np.random.rand() == rng_draw[2]
    got = b.train_step(*data[2])
    assert abs(got - expected) <= 1e-6, (got, expected)
    assert b.scheduler.last_epoch == 3


def test_truncated_checkpoint_is_detected_and_previous_used(tmp_path, caplog):
    e = make(tmp_path)
    data = batches(2, 7)
    e.train_step(*data[0])
    e.save()
    e.train_step(*data[1])
    last = e.save()
    victim = max((f for f in last.iterdir() if f.suffix == ".distcp"), key=lambda f: f.stat().st_size)
    size = victim.stat().st_size
    with open(victim, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CheckpointError, match=victim.name):
        validate_checkpoint(last)
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(tmp_path / "ck").name == "step_1"
    assert "step_2" in caplog.text and victim.name in caplog.text
    f = make(tmp_path)
    info = f.load()  # resume falls back to the previous good one
    assert info["step"] == 1 and f.step == 1
    ref = make(tmp_path)
    ref.train_step(*data[0])
    for (n, p), (_, q) in zip(f.model.named_parameters(), ref.model.named_parameters()):
        assert torch.equal(p, q), n
    with pytest.raises(CheckpointError, match="truncated"):
        f.load(last)


def test_interrupted_save_never_hides_the_last_good_one(tmp_path):
    e = make(tmp_path)
    e.train_step(*batches(1, 3)[0])
    e.save()
    # a crash mid-save leaves step_N.tmp (no marker) — and a step dir without marker is incomplete too
    (tmp_path / "ck" / "step_5.tmp").mkdir()
    (tmp_path / "ck" / "step_5.tmp" / "__0_0.distcp").write_bytes(b"partial")
    (tmp_path / "ck" / "step_9").mkdir()
    assert latest_checkpoint(tmp_path / "ck").name == "step_1"
    with pytest.raises(CheckpointError, match="incomplete"):
        validate_checkpoint(tmp_path / "ck" / "step_9")
    assert make(tmp_path).load()["step"] == 1
    e.save(step=2)  # the next save cleans stale .tmp dirs
    assert not (tmp_path / "ck" / "step_5.tmp").exists()
    marker = json.loads((tmp_path / "ck" / "step_2" / "COMPLETE.json").read_text())
    assert marker["step"] == 2 and marker["files"]


def test_keep_last_n_prunes(tmp_path):
    e = make(tmp_path, keep_last_n=2)
    for _i, b in enumerate(batches(4, 11)):
        e.train_step(*b)
        e.save()
    assert [s for s, _ in list_checkpoints(tmp_path / "ck")] == [3, 4]


def test_interval_saves_from_train_loop(tmp_path):
    e = make(tmp_path, interval=2)
    for b in batches(4, 1):
        e.train_step(*b)
        e.maybe_save()
    assert [s for s, _ in list_checkpoints(tmp_path / "ck")] == [2, 4]


def test_export_hf_roundtrip(tmp_path):
    from forge.models.hf_io import load_model

    e = make(tmp_path)
    e.train_step(*batches(1, 5)[0])
    out = e.export_hf(tmp_path / "hf")
    m = load_model(out)
    for (n, p), (_, q) in zip(e.model.named_parameters(), m.named_parameters()):
        assert torch.equal(p, q), n


def test_load_without_dir_or_checkpoint(tmp_path):
    e = TrainEngine({"model": {"tiny": "qwen2"}, "loss": {"name": "grpo", "beta": 0.0}})
    with pytest.raises(ValueError, match="checkpoint.dir"):
        e.save()
    assert make(tmp_path).load() is None


def _train_then_die_mid_save(root: str, seed: int, out: str) -> None:
    import os
    import signal

    import forge.trainer.checkpoint as ck

    torch.set_num_threads(1)
    from pathlib import Path

    e = make(Path(root))
    data = batches(3, seed)
    e.train_step(*data[0])
    e.train_step(*data[1])
    e.save()
    torch.save(e.train_step(*data[2]), out)

    def die(*a, **k):  # SIGKILL in the middle of writing step_3
        os.kill(os.getpid(), signal.SIGKILL)

    ck.dcp.save = die
    e.save()


def test_kill_mid_save_then_resume_gives_identical_next_loss(tmp_path):
    import multiprocessing as mp

    seed = int(torch.randint(0, 10_000, (1,)))
    out = str(tmp_path / "loss.pt")
    p = mp.get_context("spawn").Process(target=_train_then_die_mid_save, args=(str(tmp_path), seed, out))
    p.start()
    p.join(120)
    assert p.exitcode == -9  # killed, not a clean exit
    assert (tmp_path / "ck" / "step_3.tmp").is_dir()  # the interrupted save
    assert latest_checkpoint(tmp_path / "ck").name == "step_2"
    e = make(tmp_path)
    assert e.load()["step"] == 2
    assert abs(e.train_step(*batches(3, seed)[2]) - torch.load(out)) <= 1e-6
