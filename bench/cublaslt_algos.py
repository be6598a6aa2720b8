"""Every cuBLASLt algorithm its heuristic offers for the decode GEMMs, timed, vs what F.linear runs.

    python bench/cublaslt_algos.py --out algos.json     # one GPU, Qwen2.5-0.5B shapes at M=256, bf16

torch asks cuBLASLt's heuristic for one algorithm per shape and runs it. This asks for all its
candidates (forge.engine.cublaslt: ctypes on the libcublasLt torch has loaded; split-K only with
float32 partials) and times each inside a CUDA graph over 24 layers' weights (each weight read from
HBM, as in a decode step): what `EngineConfig.tune_gemms` picks from at engine start-up.

    python bench/cublaslt_algos.py --wide --out wide.json   # + every config cuBLASLt accepts

`--wide` also enumerates the configurations cublasLtMatmulAlgoCheck accepts around the heuristic's
proposals (LtMatmul.configs: tiles x split-K x custom options x cluster shapes, and every other
algorithm id's tiles x stages), screens each with one short timing and re-times the fastest few:
whether a search wider than the heuristic's list finds faster kernels.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import _record  # noqa: E402  (bench/_record.py: commit, command, device, date in every result file)

from forge.engine.cublaslt import GemmTuner, LtMatmul  # noqa: E402
from forge.engine.timing import graph_time_us  # noqa: E402

SHAPES = {"qkv": (1152, 896, True), "o": (896, 896, False), "gate_up": (9728, 896, False),
          "down": (896, 4864, False), "lm_head": (151936, 896, False)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--gemms", default="gate_up,down,qkv,o,lm_head")
    ap.add_argument("--wide", action="store_true", help="also search every config cuBLASLt accepts")
    ap.add_argument("--budget-s", type=float, default=60.0, help="screening time per GEMM for --wide")
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    tuner = GemmTuner(dev, dt)  # the engine's handle and workspace
    torch.manual_seed(0)
    res = {"device": torch.cuda.get_device_name(), "batch": args.batch, "runs": []}
    table = []
    for name in args.gemms.split(","):
        n, k, has_bias = SHAPES[name]
        layers = 1 if name == "lm_head" else args.layers
        x = torch.randn(args.batch, k, device=dev).to(dt)
        w_ = [(torch.randn(n, k, device=dev) * k ** -0.5).to(dt) for _ in range(layers)]
        b_ = [torch.randn(n, device=dev).to(dt) if has_bias else None for _ in range(layers)]
        out = torch.empty(args.batch, n, device=dev, dtype=dt)
        ref = F.linear(x, w_[0], b_[0]).float()
        base = graph_time_us(lambda: [F.linear(x, w_[i], b_[i]) for i in range(layers)]) / layers
        print(f"{name:8} F.linear {base:8.2f} us", flush=True)
        res["runs"].append({"gemm": name, "kernel": "F.linear", "us": round(base, 2)})
        lt = LtMatmul(tuner.lib, tuner.handle, args.batch, n, k, has_bias, dt, tuner.ws)
        best = None
        for j, algo in enumerate(lt.candidates()):
            try:
                err = float((lt(x, w_[0], b_[0], algo, out).float() - ref).abs().max() / ref.abs().max())
                us = graph_time_us(lambda: [lt(x, w_[i], b_[i], algo, out) for i in range(layers)]) / layers
            except Exception as e:
                print(f"{name:8} algo {j}: {e}", flush=True)
                continue
            row = {"gemm": name, "kernel": f"lt#{j}", "us": round(us, 2), "waves": round(algo.waves, 3),
                   "workspace": algo.workspace_size, "rel_err": err, "config": lt.describe(algo)}
            res["runs"].append(row)
            print(f"{name:8} algo {j:2d}: {us:8.2f} us  waves {algo.waves:5.2f}  ws {algo.workspace_size:>9}  "
                  f"rel err {err:.1e}  {row['config']}", flush=True)
            if err < 1e-2 and (best is None or us < best["us"]):
                best = row
        wide = wide_search(name, lt, x, w_, b_, out, ref, layers, args.budget_s, res) if args.wide else None
        table.append((name, base, best, wide))
        lt.close()
    print(f"\n| GEMM (M={args.batch}) | F.linear us | best heuristic candidate us | best of the wide search us "
          f"| wide config |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name, base, best, wide in table:
        h = f"{best['us']:.2f} ({best['kernel']})" if best else "-"
        wd = f"{wide['us']:.2f}" if wide else "-"
        print(f"| {name} | {base:.2f} | {h} | {wd} | {wide['config'] if wide else ''} |")
    if args.out:
        _record.write_json(args.out, res, indent=1)


def wide_search(name, lt, x, w_, b_, out, ref, layers, budget_s, res) -> dict | None:
    """Screen every accepted config (one short timing each, within budget_s), re-time the best 6."""
    t0 = time.perf_counter()
    cands = lt.configs(lt.candidates(), budget_s=budget_s)
    random.Random(0).shuffle(cands)  # the screening budget samples the whole space, not its first ids
    enum_s = time.perf_counter() - t0
    scale = ref.abs().max()
    screened, skipped = [], 0
    t0 = time.perf_counter()
    for algo in cands:
        if time.perf_counter() - t0 > budget_s:
            skipped += 1
            continue
        try:
            err = float((lt(x, w_[0], b_[0], algo, out).float() - ref).abs().max() / scale)
            if not err < 1e-2:
                continue
            us = graph_time_us(lambda: [lt(x, w_[i], b_[i], algo, out) for i in range(layers)], replays=3) / layers
        except RuntimeError:
            continue
        screened.append((us, algo, err))
    screened.sort(key=lambda r: r[0])
    final = []
    for _, algo, err in screened[:6]:
        us = graph_time_us(lambda: [lt(x, w_[i], b_[i], algo, out) for i in range(layers)], replays=9) / layers
        final.append({"gemm": name, "kernel": "wide", "us": round(us, 2), "workspace": algo.workspace_size,
                      "rel_err": err, "config": lt.describe(algo)})
    final.sort(key=lambda r: r["us"])
    summary = {"gemm": name, "accepted_configs": len(cands), "enumeration_truncated": lt.truncated,
               "screened": len(screened), "over_budget": skipped,
               "enumerate_s": round(enum_s, 2), "screen_s": round(time.perf_counter() - t0, 1), "best": final}
    res.setdefault("wide", []).append(summary)
    print(f"{name:8} wide: {len(cands)} configs accepted ({enum_s:.1f} s), {len(screened)} timed, "
          f"{skipped} over budget; best {[r['us'] for r in final]}", flush=True)
    for r in final[:3]:
        print(f"{name:8}   {r['us']:8.2f} us  {r['config']}", flush=True)
    return final[0] if final else None


if __name__ == "__main__":
    main()
