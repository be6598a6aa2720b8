"""bench/generate_throughput.py runs end to end (CPU, --smoke) and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generate_throughput_smoke(tmp_path):
    out = tmp_path / "gen.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "generate_throughput.py"), "--smoke", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["forge"]["tokens"] == 8 * 16 and res["forge"]["tokens_per_s"] > 0
    assert res["hf"]["tokens_per_s"] > 0 and res["bound"]["tokens_per_s"] > 0
    assert res["forge_over_hf"] > 0 and 0 < res["forge_over_bound"] < 1
    # roofline: the smoke model's GEMM weights by hand (hidden 64, 4 q / 2 kv heads of 16, mlp 128, 2 layers,
    # vocab 512 tied): per layer q 64x64, k and v 32x64, o 64x64, gate / up 128x64, down 64x128; + lm_head 512x64
    elems = 2 * (64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 128 * 64) + 512 * 64
    assert res["roofline"]["weight_gemm_flops_per_step"] == 2 * 8 * elems
    assert 0 < res["roofline"]["tokens_per_s"] <= res["bound"]["tokens_per_s"] * (1 + 1e-9)
    for line in ("forge LLMEngine", "HF generate", "bandwidth bound", "roofline", "forge / HF", "forge / bound"):
        assert line in r.stdout


def _bench(tmp_path: Path, *argv: str) -> dict:
    out = tmp_path / f"gen{'_'.join(argv)}.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "generate_throughput.py"), "--smoke", "--skip-hf",
                        "--out", str(out), *argv], capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return json.loads(out.read_text())


def test_generate_throughput_tensor_parallel_smoke(tmp_path):
    """--tp 2 on CPU: two gloo processes; the same requests (seeded sampling) give the same logprobs as --tp 1."""
    tp2, tp1 = _bench(tmp_path, "--tp", "2"), _bench(tmp_path)
    assert tp2["tensor_parallel_size"] == tp2["forge"]["tensor_parallel_size"] == 2
    assert tp2["forge"]["tokens"] == 8 * 16 and tp2["forge"]["tokens_per_s"] > 0
    assert abs(tp2["forge"]["logprob_mean"] - tp1["forge"]["logprob_mean"]) < 1e-5
