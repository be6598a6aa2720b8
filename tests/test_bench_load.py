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

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_module():
    spec = importlib.util.spec_from_file_location("bench_load", ROOT / "bench" / "load.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _smoke(tmp_path, *argv: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "load.json"
    path = [str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "load.py"), "--smoke", *argv, "--out", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r, json.loads(out.read_text())


def _check(res: dict, backend: str, services: set[str]) -> None:
    rec = res["record"]
    assert rec["commit"] and "--smoke" in rec["command"] and rec["date"] and res["machine"]["cpus"] >= 1
    assert {(x["backend"], x["service"]) for x in res["results"]} == {(backend, s) for s in services}
    for x in res["results"]:
        for w in ("wave1", "wave2"):
            s = x[w]
            assert s["calls"] == 500 and s["errors"] == 0 and s["calls_per_s"] > 0
            assert 0 < s["p50_ms"] <= s["p99_ms"] <= s["max_ms"]
            # the reward service records 9 metrics a call (4 reductions of math and total, + count)
            assert s["metric_records"] == (9 * 500 if x["service"] == "reward" else 0)
        assert x["memory_before_mib"]["controller_mib"] > 0


def test_load_smoke(tmp_path):
    r, res = _smoke(tmp_path)
    _check(res, "local", {"echo", "reward"})
    for col in ("calls/s", "p50 ms", "p99 ms", "errors"):
        assert col in r.stdout


@pytest.mark.monarch
def test_load_smoke_monarch(tmp_path):
    _, res = _smoke(tmp_path, "--backends", "monarch", "--services", "echo")
    _check(res, "monarch", {"echo"})
    assert res["results"][0]["memory_before_mib"]["children_mib"] > 0  # the replicas' procs are counted


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
    expected = {f"RuntimeError: boom {i}" for i in raising} | {f"call {i}: wrong answer" for i in wrong}
    assert len(s["first_errors"]) == min(5, s["errors"]) and set(s["first_errors"]) <= expected
