"""Decode-step GEMMs at the bench's batch: cuBLAS (F.linear) vs forge.engine.gemm's TMA kernel.

    python bench/decode_gemm.py --out gemm.json        # one Hopper GPU, Qwen2.5-0.5B shapes, bf16

Every layer has its own weights (24 copies, as in the model) and one CUDA graph runs the GEMM once
per layer, so each weight comes from HBM as in a decode step (one 17 MB gate/up weight timed
repeatedly stays in the 50 MB L2). gate_up is timed with its activation: cuBLAS + `silu_mul` vs
the gated epilogue. Each TMA row is one (tile, warps, stages, split-K) config; the table gives the
best per GEMM next to cuBLAS, and every config's output is checked against cuBLAS's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from forge.engine import gemm as G  # noqa: E402
from forge.engine import kernels as K  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_decode import graph_us  # noqa: E402

# name: (N, K, bias, gated) for Qwen2.5-0.5B (hidden 896, 14 q / 2 kv heads of 64, intermediate 4864)
SHAPES = {"qkv": (1152, 896, True, False), "o": (896, 896, False, False), "gate_up": (4864, 896, False, True),
          "down": (896, 4864, False, False), "lm_head": (151936, 896, False, False)}


def configs(name: str, quick: bool):
    tiles = [(64, 64), (64, 128), (64, 256), (128, 64), (128, 128), (128, 256)]
    ks = [(64, 4), (128, 3)]
    splits = {"qkv": (1, 2, 4), "o": (1, 2, 4), "down": (1, 2, 4, 8)}.get(name, (1,))
    for (bm, bn), (bk, st), warps, sk in itertools.product(tiles, ks, (4, 8), splits):
        if bm == 64 and warps == 8:  # one warpgroup covers 64 rows
            continue
        if name == "lm_head" and (bm, bn) not in ((128, 128), (128, 256)):
            continue
        b_tiles = 2 if SHAPES[name][3] else 1
        if st * (bm * bk + b_tiles * bn * bk) * 2 > 220 * 1024:  # shared memory of the pipeline
            continue
        if quick and (warps == 8 or bk == 128):
            continue
        yield dict(block=(bm, bn, bk), num_warps=warps, num_stages=st, split_k=sk)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--gemms", default="gate_up,down,qkv,o,lm_head")
    ap.add_argument("--quick", action="store_true", help="4 warps, BK 64 only")
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    res = {"device": torch.cuda.get_device_name(), "batch": args.batch, "runs": []}
    ws = G.LinearWorkspace(8 << 20, 4096, dev)
    table = []
    for name in args.gemms.split(","):
        n, k, has_bias, gated = SHAPES[name]
        layers = 1 if name == "lm_head" else args.layers
        rows = 2 * n if gated else n
        x = torch.randn(args.batch, k, device=dev).to(dt)
        ws_ = [(torch.randn(rows, k, device=dev) * k ** -0.5).to(dt) for _ in range(layers)]
        bs_ = [torch.randn(rows, device=dev).to(dt) if has_bias else None for _ in range(layers)]

        def cublas(i):
            y = F.linear(x, ws_[i], bs_[i])
            return K.silu_mul(y[:, :n], y[:, n:]) if gated else y

        ref = cublas(0).float()
        base = graph_us(lambda: [cublas(i) for i in range(layers)]) / layers
        flop = 2 * args.batch * k * rows
        res["runs"].append({"gemm": name, "kernel": "cublas" + ("+silu_mul" if gated else ""), "us": round(base, 2)})
        print(f"{name:8} cuBLAS{' + silu_mul' if gated else '':12} {base:8.2f} us  {flop / base / 1e6:6.0f} TFLOP/s",
              flush=True)
        best = None
        for cfg in configs(name, args.quick):
            try:
                def call(i):
                    return G.linear(x, ws_[i], bs_[i], gated=gated, workspace=ws, **cfg)
                err = float((call(0).float() - ref).abs().max() / ref.abs().max())
                us = graph_us(lambda: [call(i) for i in range(layers)]) / layers
            except Exception as e:
                res["runs"].append({"gemm": name, "kernel": "tma", **cfg, "error": f"{type(e).__name__}: {str(e)[:160]}"})
                print(f"{name:8} {cfg} failed: {type(e).__name__}: {str(e)[:160]}", flush=True)
                continue
            row = {"gemm": name, "kernel": "tma", **cfg, "us": round(us, 2), "rel_err": err}
            res["runs"].append(row)
            print(f"{name:8} tma {cfg['block']} w{cfg['num_warps']} s{cfg['num_stages']} k{cfg['split_k']}: "
                  f"{us:8.2f} us  {flop / us / 1e6:6.0f} TFLOP/s  rel err {err:.1e}", flush=True)
            assert err < 2e-2, (name, cfg, err)
            if best is None or us < best["us"]:
                best = row
        table.append((name, base, best))
    print("\n| GEMM (M=%d) | cuBLAS us | best TMA us | config |" % args.batch)
    print("| --- | ---: | ---: | --- |")
    for name, base, best in table:
        if best:
            cfg = f"{best['block']} w{best['num_warps']} s{best['num_stages']} split-K {best['split_k']}"
            print(f"| {name} | {base:.2f} | {best['us']:.2f} | {cfg} |")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
