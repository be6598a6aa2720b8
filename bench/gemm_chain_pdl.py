"""What programmatic dependent launch (PDL) could take off a decode step's kernel boundaries.

    python bench/gemm_chain_pdl.py --out pdl.json      # one GPU (sm_90+), bf16, M=256

A decode step at M=256 is a chain of ~150 short kernels, each of which pays a ramp-up (launch, first
tile loads) and a tail; the GEMMs spend 2-4 us of their 4-10 us that way (docs/perf/NOTES_generate.md).
With PDL a kernel is launched while its predecessor still runs and waits (griddepcontrol.wait) only
before it reads the predecessor's output: its launch, and any loads that do not depend on that output
(the weights), overlap the predecessor. cuBLAS kernels do not take part, so the engine cannot use it
today; this script measures the gain on chains of our own Triton GEMMs, to decide whether replacing
cuBLAS in the decode step is worth it.

Chains (24 links, each link's output is the next link's input, each link with its own weights so they
come from HBM as in a decode step):
- `o`: 896 -> 896 (the o projection's shape), 24 times;
- `mlp`: 896 -> 4864 -> 896 (up, down), 12 times.

Rows, us per chain link: cuBLAS (F.linear); Triton without PDL; Triton with PDL (wait at the start,
dependents allowed to launch right after it, or `late`: after the last loads); `prefetch`: the link's
weight rows prefetched into L2 (bulk TMA prefetches) before the wait.
Checks: every PDL / prefetch chain must give the plain Triton chain's output bit for bit (a missing or
misplaced wait would read a link's input before its predecessor wrote it); the Triton chain's distance from
cuBLAS's is recorded (bf16 rounding, amplified along the chain).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import _record  # noqa: E402  (bench/_record.py: commit, command, device, date in every result file)

from forge.engine.timing import graph_time_us  # noqa: E402


@triton.jit
def _linear_kernel(A, W, OUT, M, N, K, s_a, s_w, s_o, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                   PDL: tl.constexpr, PREFETCH_W: tl.constexpr, LATE: tl.constexpr):
    """OUT[M, N] = A[M, K] @ W[N, K]^T, one [BM, BN] tile per program (M tiles of one N tile adjacent)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    pid_m = pid % num_m
    pid_n = pid // num_m
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    if PREFETCH_W:  # this tile's weight rows into L2 before the wait: one bulk (TMA) prefetch per row
        addr = (W + rn.to(tl.int64) * s_w).to(tl.int64, bitcast=True)
        nbytes = tl.full([BN], 0, tl.int32) + K * 2
        tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $3; "
                                  "mov.u32 $0, 0; }", "=r,l,r,r", [addr, (rn < N).to(tl.int32), nbytes],
                                  dtype=tl.int32, is_pure=False, pack=1)
    if PDL:
        tl.extra.cuda.gdc_wait()  # the predecessor's writes (A) are visible from here on
        if not LATE:
            tl.extra.cuda.gdc_launch_dependents()  # the next link may launch (and prefetch its weights) now
    acc = tl.zeros([BM, BN], tl.float32)
    for k in range(0, K, BK):
        a = tl.load(A + rm[:, None] * s_a + (k + rk)[None, :], mask=(rm < M)[:, None] & (k + rk < K)[None, :], other=0.0)
        w = tl.load(W + rn[:, None] * s_w + (k + rk)[None, :], mask=(rn < N)[:, None] & (k + rk < K)[None, :], other=0.0)
        acc = tl.dot(a, w.T, acc)
    if PDL and LATE:  # after the last loads: dependents that launch now do not take slots from this grid's tiles
        tl.extra.cuda.gdc_launch_dependents()
    tl.store(OUT + rm[:, None] * s_o + rn[None, :], acc.to(OUT.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])


def triton_linear(x, w, out, cfg, pdl: bool, prefetch: bool, late: bool = False):
    bm, bn, bk, warps, stages = cfg
    m, k = x.shape
    n = w.shape[0]
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _linear_kernel[grid](x, w, out, m, n, k, x.stride(0), w.stride(0), out.stride(0), BM=bm, BN=bn, BK=bk,
                         PDL=pdl, PREFETCH_W=prefetch, LATE=late, num_warps=warps, num_stages=stages,
                         **({"launch_pdl": True} if pdl else {}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--links", type=int, default=24)
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    m = args.rows
    chains = {
        "o": [(896, 896)] * args.links,
        "mlp": [(896, 4864), (4864, 896)] * (args.links // 2),
    }
    # tile configs: (BM, BN, BK, warps, stages); each chain keeps its fastest plain-Triton config per shape
    cfgs = [(bm, bn, bk, 4, s) for bm, bn, bk, s in itertools.product((64, 128), (32, 64, 128), (64, 128), (3, 4))
            if not (bm == 128 and bn == 128 and bk == 128)]
    res = {"device": torch.cuda.get_device_name(), "rows": m, "chains": {}}
    for name, dims in chains.items():
        ws = [(torch.randn(n, k, device=dev) * k ** -0.5).to(dt) for k, n in dims]
        x0 = torch.randn(m, dims[0][0], device=dev).to(dt)
        bufs = {n: torch.empty(m, n, device=dev, dtype=dt) for _, n in dims}
        best: dict[tuple[int, int], tuple] = {}
        with torch.inference_mode():
            for k, n in sorted(set(dims)):  # tile config per shape, timed alone over distinct weights
                wk = [w for w, (kk, nn) in zip(ws, dims) if (kk, nn) == (k, n)]
                xk = torch.randn(m, k, device=dev).to(dt)
                ok = []
                for c in cfgs:
                    try:
                        us = graph_time_us(lambda: [triton_linear(xk, w, bufs[n], c, False, False) for w in wk],
                                           replays=5) / len(wk)
                        ok.append((us, c))
                    except Exception:  # noqa: BLE001 - a config that does not fit (shared memory) is skipped
                        continue
                best[(k, n)] = min(ok)[1]
                cub = graph_time_us(lambda: [F.linear(xk, w) for w in wk], replays=5) / len(wk)
                print(f"{name}: {k}->{n}: best Triton tile {best[(k, n)]} {min(ok)[0]:.2f} us, cuBLAS {cub:.2f} us "
                      f"({len(ok)} configs)", flush=True)

            def chain(kind: str):
                x = x0
                for w, (k, n) in zip(ws, dims):
                    out = bufs[n] if x is not bufs[n] else torch.empty_like(bufs[n])
                    if kind == "cublas":
                        x = F.linear(x, w)
                    else:
                        x = triton_linear(x, w, out, best[(k, n)], kind != "triton", "prefetch" in kind, "late" in kind)
                return x

            row = {"tiles": {f"{k}->{n}": c for (k, n), c in best.items()}}
            ref = chain("cublas").float()
            plain = chain("triton").float()
            row["triton_vs_cublas_rel_err"] = float((plain - ref).norm() / ref.norm())
            for kind in ("cublas", "triton", "triton+pdl", "triton+pdl+prefetch", "triton+pdl+late",
                         "triton+pdl+late+prefetch"):
                out = chain(kind).float()
                if kind.startswith("triton+"):
                    row[f"{kind}_identical_to_triton"] = same = bool(torch.equal(out, plain))
                    assert same, f"{name}: {kind} differs from the plain Triton chain (a dependency was not waited on)"
                us = graph_time_us(lambda: chain(kind), replays=9) / len(dims)
                row[kind] = round(us, 2)
                print(f"{name:4} {kind:22} {us:7.2f} us per link", flush=True)
        res["chains"][name] = row
        print(json.dumps(row), flush=True)
    if args.out:
        _record.write_json(args.out, res, indent=1)


if __name__ == "__main__":
    main()
