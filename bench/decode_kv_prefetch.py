"""The decode step with the next layer's KV cache prefetched into L2 beside this layer's GEMMs.

    python bench/decode_kv_prefetch.py --out kv_prefetch.json   # one GPU (sm_90+): Qwen2.5-0.5B widths, bf16

A decode step at B=256 alternates between GEMMs that leave most of the DRAM bandwidth idle (M=256:
latency- or compute-bound) and an attention kernel that is DRAM-bound on the KV cache. The blocks
layer i+1's attention reads are known before its q is computed, so a side stream can ask the L2 for
them while layer i's projections run (`forge.engine.kernels.kv_prefetch`, bulk TMA prefetches from
one small program). Rows: us per decode step (24 layers + final norm + lm_head, tuned GEMMs, folded
norms: what the engine's graph runs, without the sampler) for each prefetch size (MB per layer) and
issue point (before which kernel of the layer before), at several context lengths; and whether the
logits are bit-identical to the step without prefetch (they must be: a prefetch is a cache hint).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from forge.engine import kernels as K  # noqa: E402
from forge.engine.cublaslt import GemmTuner  # noqa: E402
from forge.engine.fused import FusedDecode  # noqa: E402
from forge.engine.timing import graph_time_us  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_streams import build  # noqa: E402


def apply(spec: str | dict) -> dict:
    """Set forge.engine.kernels attributes from 'KEY=VALUE,...' (or a dict); returns the previous values."""
    items = spec.items() if isinstance(spec, dict) else [kv.split("=") for kv in spec.split(",") if kv]
    saved = {}
    for k, v in items:
        saved[k] = getattr(K, k)
        setattr(K, k, type(saved[k])(v))
    return saved


def graph_kernel_table(fn, replays: int = 10) -> list:
    """(us per step, launches per step, kernel name) of one CUDA graph of fn(), from the torch profiler
    over `replays` replays (kernels inside graphs are traced individually)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            g.replay()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append((round(t / replays, 1), e.count // replays, e.key[:80]))
    return sorted(rows, reverse=True)


def isolated_attention(fd, kc, vc, bt, tok, b: int, ctxs: list[int]) -> list:
    """What an L2-resident share of the KV is worth to the attention kernel alone: per layer, a prefetch of
    the first X MB of its cache (or none), a 40 us spin so that it completes, then the attention; 24 layers
    in one graph. The attention kernel's own time comes from the profiler's per-kernel table."""
    dev = kc.device
    layers, nq, nk = kc.shape[0], fd.num_heads * fd.head_dim, fd.num_kv * fd.head_dim
    qkv = torch.randn(b, nq + 2 * nk, device=dev).to(kc.dtype)
    x = torch.randn(b, fd.embed.shape[1], device=dev).to(kc.dtype)
    spin = 70_000  # cycles: ~40 us at the H200's ~1.75 GHz
    lw = fd.layers[0]
    out = []
    for ctx in ctxs:
        pos = torch.full((b,), ctx, device=dev, dtype=torch.int32)
        base = None
        for mb in (0, 8, 16, 24, 32, 48, 1024):
            def step():
                for i in range(layers):
                    if mb:
                        K.kv_prefetch(bt, pos, kc[i], vc[i], mb << 20)
                    torch.cuda._sleep(spin)
                    K.attention(qkv[:, :nq], qkv[:, nq:nq + nk], qkv[:, nq + nk:], kc[i], vc[i], bt, pos, fd.cos,
                                fd.sin, fd.num_heads, workspace=fd.attn_workspace, norm_x=x, norm_eps=lw.ln1_eps,
                                qkv_bias=lw.qkv_b)
            with torch.inference_mode():
                table = graph_kernel_table(step)
            us = {name: t / layers for t, n, name in table}
            att = us.get("_attention_kernel", float("nan"))
            pf = us.get("_kv_prefetch_kernel", 0.0)
            base = att if base is None else base
            out.append({"ctx": ctx, "prefetch_mb": mb, "attention_us": round(att, 2), "prefetch_kernel_us": round(pf, 2),
                        "saved_us": round(base - att, 2)})
            print(f"isolated: ctx {ctx:4} prefetch {mb:5} MB (completed): attention {att:6.2f} us/layer "
                  f"({base - att:+6.2f} faster), prefetch kernel {pf:6.2f} us", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--ctx", default="128,384,640")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--mb", default="8,16,24,32,48", help="prefetch sizes, MB of K+V per layer")
    ap.add_argument("--at", default="o,gate_up,silu,down", help="issue points (kernels.KV_PREFETCH_AT values)")
    ap.add_argument("--replays", type=int, default=15)
    ap.add_argument("--settings", default="", help="';'-separated kernels settings to run the sweep under, e.g. "
                    "';KV_PREFETCH_HINT=evict_last;ATTN_KV_EVICT=evict_first'")
    ap.add_argument("--isolated", action="store_true", help="also: the attention kernel alone after a completed "
                    "prefetch (what an L2 hit is worth)")
    ap.add_argument("--isolated-rows", type=int, default=K.KV_PREFETCH_ROWS, help="kernels.KV_PREFETCH_ROWS there")
    ap.add_argument("--table", default="", help="also: kernel tables of the step at ctx 384 for these "
                    "';'-separated kernels settings, e.g. 'KV_PREFETCH_BYTES=0;KV_PREFETCH_BYTES=25165824,"
                    "KV_PREFETCH_AT=silu'")
    args = ap.parse_args()
    dev = torch.device("cuda")
    if not K.kv_prefetch_supported(dev):
        raise SystemExit("kv prefetch needs an sm_90+ GPU")
    torch.manual_seed(0)
    model = build(args.layers, args.vocab, dev)
    b, bs, hkv, d = args.batch, 64, 2, 64
    ctxs = [int(x) for x in args.ctx.split(",")]
    per = max(ctxs) // bs + 1
    nb = b * per + 1
    kc = torch.randn(args.layers, nb, bs, hkv, d, device=dev).to(torch.bfloat16)
    vc = torch.randn_like(kc)
    bt = torch.randperm(nb - 1, device=dev).add(1).int()[: b * per].view(b, per).contiguous()
    tok = torch.randint(0, args.vocab, (b,), device=dev)
    fd = FusedDecode(model, 4096, fold_norms=True)
    fd.reserve(b)
    tuner = GemmTuner(dev, torch.bfloat16)
    fd.tune_gemms(b, tuner)
    res = {"device": torch.cuda.get_device_name(), "batch": b, "layers": args.layers, "runs": []}
    ref_all: dict[int, torch.Tensor] = {}
    base_all: dict[int, float] = {}
    for spec in args.settings.split(";"):
        settings = apply(spec)
        for ctx in ctxs:
            pos = torch.full((b,), ctx, device=dev, dtype=torch.int32)
            kv_mb = b * ctx * hkv * d * 2 * 2 / 2**20
            configs = [(0, "-")] + [(float(mb), at) for at in args.at.split(",") for mb in args.mb.split(",")]
            ref = ref_all.get(ctx)
            base = base_all.get(ctx)
            for mb, at in configs:
                K.KV_PREFETCH_BYTES, K.KV_PREFETCH_AT = int(mb * 2**20), at
                with torch.inference_mode():
                    # the caches are only rewritten at position ctx (same values each call): replays are comparable
                    out = fd.forward(tok, pos, bt, kc, vc).float()
                    same = ref is None or bool(torch.equal(out, ref))
                    ref = out if ref is None else ref
                    us = graph_time_us(lambda: fd.forward(tok, pos, bt, kc, vc), replays=args.replays)
                base = us if base is None else base
                ref_all[ctx], base_all[ctx] = ref, base
                row = {"settings": spec, "ctx": ctx, "kv_mb_per_layer": round(kv_mb, 1), "prefetch_mb": mb, "at": at,
                       "us": round(us, 1), "speedup": round(base / us, 4), "logits_identical": same}
                res["runs"].append(row)
                print(f"{spec or 'defaults':45} ctx {ctx:4} (KV {kv_mb:5.1f} MB/layer) prefetch {mb:5.1f} MB before "
                      f"{at:8}: {us:8.1f} us/step x{base / us:.3f}  identical={same}", flush=True)
        apply(settings)
    K.KV_PREFETCH_BYTES = 0
    if args.isolated:
        K.KV_PREFETCH_ROWS = args.isolated_rows
        res["isolated"] = isolated_attention(fd, kc, vc, bt, tok, b, [int(x) for x in args.ctx.split(",")])
    if args.table:
        res["tables"] = {}
        pos = torch.full((b,), 384, device=dev, dtype=torch.int32)
        for spec in args.table.split(";"):
            saved = apply(spec)
            with torch.inference_mode():
                res["tables"][spec] = t = graph_kernel_table(lambda: fd.forward(tok, pos, bt, kc, vc))
            apply(saved)
            print(f"kernels per step at ctx 384, {spec or 'no prefetch'}:")
            for us, n, name in t[:8]:
                print(f"  {us:8.1f} us  x{n:3}  {name}")
    tuner.close()
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
