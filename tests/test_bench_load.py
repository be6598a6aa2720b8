"""bench/load.py: the --smoke run (500 concurrent route() calls, local) and its error accounting."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load_module():
    spec = importlib.util.spec_from_file_location("bench_load", ROOT / "bench" / "load.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_load_smoke(tmp_path):
    out = tmp_path / "load.json"
    path = [str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "load.py"), "--smoke", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["commit"] and "--smoke" in res["command"] and res["date"] and res["device"]["cpus"] >= 1
    assert {(x["backend"], x["service"]) for x in res["results"]} == {("local", "echo"), ("local", "reward")}
    for x in res["results"]:
        for w in ("wave1", "wave2"):
            s = x[w]
            assert s["calls"] == 500 and s["errors"] == 0 and s["calls_per_s"] > 0
            assert 0 < s["p50_ms"] <= s["p99_ms"] <= s["max_ms"]
        assert x["memory_before_mib"]["controller_mib"] > 0
    for col in ("calls/s", "p50 ms", "p99 ms", "errors"):
        assert col in r.stdout


def test_wave_counts_exceptions_and_wrong_answers():
    load = _load_module()
    rng = random.Random()
    n = rng.randint(50, 200)
    raising = set(rng.sample(range(n), rng.randint(1, 10)))
    wrong = set(rng.sample(sorted(set(range(n)) - raising), rng.randint(1, 10)))

    async def call(i: int) -> bool:
        await asyncio.sleep(0)
        if i in raising:
            raise RuntimeError(f"boom {i}")
        return i not in wrong

    s = asyncio.run(load.wave(call, n))
    assert s["calls"] == n and s["errors"] == len(raising) + len(wrong)
    assert any("RuntimeError: boom" in e for e in s["first_errors"])
