"""The fused decode step's small kernels at the decode bench's shape, per launch config.

    python bench/decode_kernels.py --out kernels.json     # one GPU: B=256, Qwen2.5-0.5B widths, bf16

- sampler (`kernels.sample`, B x 151,936 logits): logits per load, loads per program, warps of the first
  pass; timed in a CUDA graph alternating two logits buffers (2 x 78 MB: each call reads from HBM, as
  after the lm_head GEMM), next to one read of the logits at 4.2 TB/s.
- `add_rmsnorm` (hidden 896) warps and `silu_mul` (intermediate 4864) block / warps: 49 and 24 launches
  per decode step; timed as 24 calls in a graph.
- the MLP (gate/up GEMM, silu*mul, down GEMM) over 24 layers' weights: as the decode step runs it
  (F.linear), and with gate/up computed transposed (W_gu @ y^T: cuBLAS's faster kernel for that shape),
  silu*mul on the transposed halves and down reading the transposed activations.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import _record  # noqa: E402  (bench/_record.py: commit, command, device, date in every result file)

from forge.engine import kernels as K  # noqa: E402
from forge.engine.timing import graph_time_us  # noqa: E402

CONFIGS = [(4096, 1, 8), (4096, 2, 8), (8192, 1, 16), (2048, 4, 8), (16384, 1, 16)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=151936)
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    b, v = args.batch, args.vocab
    bufs = [(torch.randn(b, v, device=dev) * 2).to(torch.bfloat16) for _ in range(2)]
    temp = torch.ones(b, device=dev)
    temp[::7] = 0  # some greedy rows, as the decode graph allows
    seed = torch.randint(0, 2 ** 62, (b,), device=dev)
    stream, ctr = torch.zeros(b, dtype=torch.int64, device=dev), torch.arange(b, device=dev)
    floor_us = b * v * 2 / (4.2e12) * 1e6
    res = {"device": torch.cuda.get_device_name(), "batch": b, "vocab": v, "runs": []}
    ref = None
    for cfg in CONFIGS:
        tok, _ = K.sample(bufs[0], temp, seed, stream, ctr, cfg=cfg)
        if ref is None:
            ref = tok
        agree = float((tok == ref).float().mean())
        us = graph_time_us(lambda: [K.sample(x, temp, seed, stream, ctr, cfg=cfg) for x in bufs]) / 2
        res["runs"].append({"cfg": list(cfg), "us": round(us, 2), "agree_with_first": agree})
        print(f"cfg {cfg}: {us:7.2f} us   ({b * v * 2 / us / 1e3:6.0f} GB/s; one read at 4.2 TB/s: {floor_us:.1f} us)"
              f"  tokens agree {agree:.3f}", flush=True)
    h = torch.randn(b, 896, device=dev).to(torch.bfloat16)
    r, w = torch.randn_like(h), torch.rand(896, device=dev).to(torch.bfloat16)
    for warps in (1, 2, 4, 8):
        us = graph_time_us(lambda: [K.add_rmsnorm(h, w, 1e-6, residual=r, num_warps=warps) for _ in range(24)]) / 24
        res["runs"].append({"kernel": "add_rmsnorm", "warps": warps, "us": round(us, 2)})
        print(f"add_rmsnorm warps {warps}: {us:6.2f} us", flush=True)
    gu = torch.randn(b, 2 * 4864, device=dev).to(torch.bfloat16)
    for block, warps in ((2048, 4), (1024, 4), (1024, 2), (512, 2), (4096, 8), (512, 4), (256, 1)):
        us = graph_time_us(lambda: [K.silu_mul(gu[:, :4864], gu[:, 4864:], block=block, num_warps=warps)
                               for _ in range(24)]) / 24
        res["runs"].append({"kernel": "silu_mul", "block": block, "warps": warps, "us": round(us, 2)})
        print(f"silu_mul block {block} warps {warps}: {us:6.2f} us", flush=True)
    import torch.nn.functional as F

    torch.manual_seed(0)
    gws = [(torch.randn(2 * 4864, 896, device=dev) * 896 ** -0.5).to(torch.bfloat16) for _ in range(24)]
    dws = [(torch.randn(896, 4864, device=dev) * 4864 ** -0.5).to(torch.bfloat16) for _ in range(24)]

    def mlp(i):
        gu_ = F.linear(h, gws[i])
        return F.linear(K.silu_mul(gu_[:, :4864], gu_[:, 4864:]), dws[i])

    def mlp_t(i):
        gt = torch.mm(gws[i], h.t())  # [2I, B]
        return F.linear(K.silu_mul(gt[:4864], gt[4864:]).t(), dws[i])

    def gate_up_t(i):
        return torch.mm(gws[i], h.t())

    ref = mlp(0).float()
    err = float((mlp_t(0).float() - ref).abs().max() / ref.abs().max())
    for name, fn in (("mlp", mlp), ("mlp_transposed", mlp_t), ("gate_up_transposed", gate_up_t),
                     ("gate_up", lambda i: F.linear(h, gws[i]))):
        us = graph_time_us(lambda: [fn(i) for i in range(24)]) / 24
        res["runs"].append({"kernel": name, "us": round(us, 2), "rel_err_vs_mlp": err})
        print(f"{name:20}: {us:6.2f} us per layer (transposed vs plain rel err {err:.1e})", flush=True)
    folded_norm_costs(res, b, dev)
    if args.out:
        _record.write_json(args.out, res, indent=1)


def folded_norm_costs(res: dict, b: int, dev: torch.device, ctx: int = 384, layers: int = 24) -> None:
    """What the folded RMSNorm (EngineConfig.fold_norms) adds to attention and silu*mul: each row's
    norm scale recomputed from the residual row (and, for q/k/v, the bias), per launch, graph-timed
    over 24 layers' caches / activations."""
    torch.manual_seed(1)
    bs, hq, hkv, d, hid = 64, 14, 2, 64, 896
    per = ctx // bs + 1
    nb = b * per + 1
    kc = torch.randn(layers, nb, bs, hkv, d, device=dev).to(torch.bfloat16)
    vc = torch.randn_like(kc)
    bt = torch.randperm(nb - 1, device=dev).add(1).int()[: b * per].view(b, per).contiguous()
    pos = torch.full((b,), ctx, device=dev, dtype=torch.int32)
    qkvs = [torch.randn(b, (hq + 2 * hkv) * d, device=dev).to(torch.bfloat16) for _ in range(layers)]
    xs = [torch.randn(b, hid, device=dev).to(torch.bfloat16) for _ in range(layers)]
    bias = torch.randn((hq + 2 * hkv) * d, device=dev).to(torch.bfloat16)
    inv = 1.0 / (1e6 ** (torch.arange(0, d, 2, device=dev).float() / d))
    fr = torch.outer(torch.arange(ctx + 64, device=dev).float(), inv)
    cos, sin = torch.cat([fr, fr], -1).cos(), torch.cat([fr, fr], -1).sin()
    nq, nk = hq * d, hkv * d

    def att(i, folded, with_bias):
        x = qkvs[i]
        return K.attention(x[:, :nq], x[:, nq:nq + nk], x[:, nq + nk:], kc[i], vc[i], bt, pos, cos, sin, hq,
                           norm_x=xs[i] if folded else None, qkv_bias=bias if with_bias else None)

    for name, folded, with_bias in (("attention", False, False), ("attention, folded norm", True, False),
                                    ("attention, folded norm + bias", True, True)):
        us = graph_time_us(lambda: [att(i, folded, with_bias) for i in range(layers)]) / layers
        res["runs"].append({"kernel": name, "batch": b, "ctx": ctx, "us": round(us, 2)})
        print(f"{name:32}: {us:6.2f} us per layer (B={b} x {ctx})", flush=True)
    gus = [torch.randn(b, 2 * 4864, device=dev).to(torch.bfloat16) for _ in range(layers)]
    for name, folded, block, warps in (("silu_mul", False, 1024, 4), ("silu_mul, folded norm", True, 1024, 4),
                                       ("silu_mul, folded norm", True, 2048, 4), ("silu_mul, folded norm", True, 2048, 8),
                                       ("silu_mul, folded norm", True, 512, 4), ("silu_mul, folded norm", True, 1024, 8)):
        us = graph_time_us(lambda: [K.silu_mul(gus[i][:, :4864], gus[i][:, 4864:], block=block, num_warps=warps,
                                               norm_x=xs[i] if folded else None) for i in range(layers)]) / layers
        res["runs"].append({"kernel": name, "batch": b, "block": block, "warps": warps, "us": round(us, 2)})
        print(f"{name:32}: {us:6.2f} us per layer (block {block}, {warps} warps)", flush=True)


if __name__ == "__main__":
    main()
