"""bench/grpo_step.py --smoke --lora runs both variants on CPU and records them (LoRA first)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~15 s: two short GRPO runs of the tiny shape
def test_grpo_step_smoke_lora_records_both_variants(tmp_path):
    out = tmp_path / "grpo_step.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "grpo_step.py"), "--smoke", "--lora", "4", "--modes", "sync",
         "--steps", "2", "--warmup", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(out.read_text())["shapes"]["tiny"]
    assert list(runs) == ["sync+lora4", "sync"]  # LoRA first: a full run that ran out of memory cannot crowd it out
    for r in runs.values():
        assert "error" not in r, r
        assert r["s_per_step"] > 0 and r["steps_measured"] >= 1
    assert 0 < runs["sync+lora4"]["sync_bytes"] < runs["sync"]["sync_bytes"] / 4  # adapters only
