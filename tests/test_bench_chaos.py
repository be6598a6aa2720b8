"""bench/chaos.py --short (issue 26): a generator replica and a reward replica are SIGKILLed
mid-step (real monarch processes); each run finishes with no episode lost or duplicated."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.monarch
def test_short_chaos_run_loses_no_episode(tiny_model, tmp_path):
    pytest.importorskip("monarch")
    out = tmp_path / "chaos.json"
    env_path = f"{ROOT / 'src'}:{ROOT}"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "chaos.py"), "--short", "--model", tiny_model,
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=400,
                       env={**__import__("os").environ, "PYTHONPATH": env_path})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    body = json.loads(out.read_text())
    assert body["record"]["command"] and body["record"]["date"]
    rows = {s["scenario"]: s for s in body["scenarios"]}
    assert sorted(rows) == ["generator", "reward"]
    for _name, row in rows.items():
        assert row["killed_pid"] and row["outcome"] == "finished", row
        assert row["steps_done"] == row["steps_requested"] == 4, row
        assert row["episodes_generated"] > 0 and row["episodes_trained"] == 4 * 16, row
        assert row["episodes_lost"] == 0 and row["episodes_duplicated"] == 0, row
        assert row["recovery_s"] is not None and row["recovery_s"] > 0, row
        assert row["as_expected"], row
    gen = rows["generator"]
    assert gen["replacement_version"] == gen["trainer_version"]  # it came back at the current weights
    assert "generator " in r.stdout and "reward " in r.stdout  # the table rows
