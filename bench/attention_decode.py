"""Decode attention kernel variants, timed the way a decode step sees them.

    python bench/attention_decode.py --out attn.json      # one GPU; Qwen2.5-0.5B heads, bf16
    python bench/attention_decode.py --smoke              # CPU interpreter (TRITON_INTERPRET=1), seconds

Every layer has its own cache (24 layers, as in the model) and one CUDA graph calls the kernel once
per layer, so each call reads its K/V from HBM. Timing one layer's cache repeatedly leaves its
33-50 MB in the 50 MB L2 of an H100/H200 and flatters every variant (docs/perf/NOTES_generate.md).

Variants: context splits, warps, pipeline stages, tokens per iteration, any forge.engine.kernels setting
(`--settings`), the cache block layout (`--layouts`: the kernel takes the cache's strides), and with
`--folded` the prologue of the engine's default step (folded norm's row scale + q/k/v bias). Each row:
us per layer and the KV bytes read per second; outputs are checked against the first variant. Sweep batch x context
to separate a launch's fixed cost from its per-block cost (docs/perf/NOTES_generate.md). Two kv heads
per program, TMA loads of cache blocks and a hand-written register prefetch were measured with this
script and dropped (commit 312631f), as was issuing the first block's loads before the RoPE
prologue (1.4 us slower per layer).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from forge.engine import kernels as K  # noqa: E402
from forge.engine.timing import graph_time_us  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _record  # noqa: E402  (bench/_record.py: commit, command, device, date in every result file)
import kernel_settings  # noqa: E402


def setup(b: int, ctx: int, layers: int, dev: torch.device, dtype: torch.dtype, hq=14, hkv=2, d=64, bs=64,
          head_major: bool = False):
    torch.manual_seed(0)
    per = ctx // bs + 1
    nb = b * per + 1
    kc = torch.randn(layers, nb, bs, hkv, d, device=dev).to(dtype)
    vc = torch.randn_like(kc)
    if head_major:  # blocks stored [Hkv, BS, D]: one head's block is contiguous; the kernel reads the strides
        kc = kc.permute(0, 1, 3, 2, 4).contiguous().permute(0, 1, 3, 2, 4)
        vc = vc.permute(0, 1, 3, 2, 4).contiguous().permute(0, 1, 3, 2, 4)
    bt = torch.randperm(nb - 1, device=dev).add(1).int()[: b * per].view(b, per).contiguous()
    pos = torch.full((b,), ctx, device=dev, dtype=torch.int32)
    qkv = torch.randn(b, (hq + 2 * hkv) * d, device=dev).to(dtype)
    q, k, v = qkv[:, : hq * d], qkv[:, hq * d: (hq + hkv) * d], qkv[:, (hq + hkv) * d:]
    inv = 1.0 / (1e6 ** (torch.arange(0, d, 2, device=dev).float() / d))
    fr = torch.outer(torch.arange(ctx + 64, device=dev).float(), inv)
    cos, sin = torch.cat([fr, fr], -1).cos(), torch.cat([fr, fr], -1).sin()
    # the folded-norm step's extra inputs: the residual rows the norm scale comes from, the q/k/v bias
    x = torch.randn(b, 896, device=dev).to(dtype)
    bias = (torch.randn((hq + 2 * hkv) * d, device=dev) * 0.1).to(dtype)
    return dict(q=q, k=k, v=v, kc=kc, vc=vc, bt=bt, pos=pos, cos=cos, sin=sin, x=x, bias=bias, hq=hq, hkv=hkv, d=d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes in the Triton interpreter (CPU; run it "
                    "with TRITON_INTERPRET=1)")
    ap.add_argument("--shapes", default="256x384,16x4096,64x1024", help="batch x context, comma separated")
    ap.add_argument("--tokens", default="", help="tokens per iteration (default: the block size)")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--stages", default="2,3,4")
    ap.add_argument("--splits", default="", help="default: 1 and 2 where the default is 1, else the default")
    ap.add_argument("--settings", default="", help="';'-separated forge.engine.kernels settings to run every "
                    "variant under, e.g. 'ATTN_PREFETCH_TABLE=False;' (empty: the defaults)")
    ap.add_argument("--layouts", default="token-major", help="cache block layouts, comma separated: token-major "
                    "([BS, Hkv, D], the engine's) and/or head-major ([Hkv, BS, D], same values)")
    ap.add_argument("--folded", action="store_true", help="as the engine's default step calls it: the folded "
                    "norm's row scale and the q/k/v bias applied in the prologue")
    args = ap.parse_args()
    ints = lambda x: [int(v) for v in x.split(",") if v]  # noqa: E731
    if args.smoke:  # triton 3.6's interpreter loads a scalar as a 1-element array; numpy >= 2.4 refuses int() of it
        import triton.runtime.interpreter as interp

        patch = interp._patch_lang_tensor
        interp._patch_lang_tensor = lambda t, scope: (patch(t, scope), scope.set_attr(
            t, "__index__", lambda self: int(self.handle.data.reshape(-1)[0])))
    dev = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    layers = 2 if args.smoke else 24
    shapes = [(4, 100), (2, 300)] if args.smoke else [tuple(int(v) for v in x.split("x")) for x in args.shapes.split(",")]
    refs: dict[tuple[int, int], torch.Tensor] = {}
    rows, results = [], {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "runs": []}
    for (b, ctx), layout in itertools.product(shapes, args.layouts.split(",")):
        s = setup(b, ctx, layers, dev, dtype, head_major=layout == "head-major")
        default_splits = K.attention_splits(b, s["hkv"], dev)
        ws = K.AttentionWorkspace(b, s["hq"], s["hkv"], s["d"], dev, splits=K.ATTN_MAX_SPLITS)
        splits_opts = ints(args.splits) or (sorted({1, 2, default_splits}) if default_splits == 1 else [default_splits])
        grid = itertools.product(ints(args.tokens) or [None], splits_opts, ints(args.warps), ints(args.stages))
        if args.smoke:
            grid = itertools.product((None, 32), sorted({1, *splits_opts}), (4,), (2,))
        ref = refs.get((b, ctx))  # the layouts hold the same values: one reference per shape
        fold = dict(norm_x=s["x"], qkv_bias=s["bias"]) if args.folded else {}
        for spec, (tokens, sp, warps, stages) in itertools.product(args.settings.split(";"), list(grid)):
            def call(i: int):
                return K.attention(s["q"], s["k"], s["v"], s["kc"][i], s["vc"][i], s["bt"], s["pos"], s["cos"],
                                   s["sin"], s["hq"], splits=sp, workspace=ws, tokens=tokens, num_warps=warps,
                                   num_stages=stages, **fold)
            saved = kernel_settings.apply(spec)
            key = dict(batch=b, ctx=ctx, layout=layout, settings=spec, tokens=tokens, splits=sp, warps=warps,
                       stages=stages)
            try:
                out = call(0).float()
                if ref is None:
                    ref = refs[(b, ctx)] = out
                err = float((out - ref).abs().max() / ref.abs().max())
                us = graph_time_us(lambda: [call(i) for i in range(layers)]) / layers if dev.type == "cuda" else float("nan")
            except Exception as e:  # a config that does not compile / fit is a row, not a crash
                results["runs"].append({**key, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                print(key, "failed:", type(e).__name__, str(e)[:200], flush=True)
                continue
            finally:
                kernel_settings.apply(saved)
            kv_bytes = b * ctx * s["hkv"] * s["d"] * 2 * s["kc"].element_size()
            row = {**key, "us_per_layer": round(us, 2), "kv_GBps": round(kv_bytes / us / 1e3, 1), "rel_err": err}
            results["runs"].append(row)
            rows.append(row)
            print(f"{layout:11} {spec or 'defaults':40} B={b:4d} ctx={ctx:5d} tokens={tokens or 'block'} splits={sp} "
                  f"warps={warps} stages={stages}: {us:7.2f} us/layer {row['kv_GBps']:8.1f} GB/s  rel err {err:.1e}",
                  flush=True)
            assert err < (2e-2 if dtype == torch.bfloat16 else 1e-5), (key, err)
    print("\n| batch x ctx | best variant | us/layer | GB/s | defaults |")
    print("| --- | --- | ---: | ---: | ---: |")
    for b, ctx in shapes:
        mine = [r for r in rows if r["batch"] == b and r["ctx"] == ctx]
        if not mine or dev.type != "cuda":
            continue
        best = min(mine, key=lambda r: r["us_per_layer"])
        base = [r for r in mine if r["tokens"] is None and not r["settings"] and r["warps"] == K.ATTN_WARPS
                and r["stages"] == (K.ATTN_STAGES_SPLIT if r["splits"] > 1 else K.ATTN_STAGES)
                and r["splits"] == K.attention_splits(b, 2, dev)]
        name = f"{best['settings'] or 'defaults'}, tokens {best['tokens'] or 'block'}, splits {best['splits']}, " \
               f"warps {best['warps']}, stages {best['stages']}"
        print(f"| {b} x {ctx} | {name} | {best['us_per_layer']} | {best['kv_GBps']} | "
              f"{base[0]['us_per_layer'] if base else '-'} |")
    if args.out:
        _record.write_json(args.out, results, indent=1)


if __name__ == "__main__":
    main()
