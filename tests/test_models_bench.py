"""bench/train_throughput.py --smoke runs end to end on CPU and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_throughput_smoke(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "train_throughput.py"), "--smoke", "--packed", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "forge-eager-sdpa" in proc.stdout and "hf-eager-sdpa" in proc.stdout
    data = json.loads(out.read_text())
    by = {r["variant"]: r for r in data["results"]}
    assert set(by) == {"hf-eager-sdpa", "forge-eager-sdpa"}
    for r in by.values():
        assert not r["error"], r["error"]
        assert r["tokens_per_s"] > 0 and 5.0 < r["loss"] < 7.5  # ~ln(512) for a random init


def test_train_throughput_smoke_tensor_parallel(tmp_path):
    """--tp 2: forge's TrainEngine on 2 CPU processes (gloo), a random-init loss, a JSON result."""
    out = tmp_path / "bench_tp.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "train_throughput.py"), "--smoke", "--tp", "2", "--out", str(out)],
        check=False, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert (data["tp"], data["dp"]) == (2, 1)
    (r,) = data["results"]
    assert not r["error"], r["error"]
    assert r["tokens_per_s"] > 0 and 5.0 < r["loss"] < 7.5
