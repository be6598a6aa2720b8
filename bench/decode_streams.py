"""The fused decode step with its batch split across CUDA streams, timed against one stream.

    python bench/decode_streams.py --out streams.json     # one GPU: Qwen2.5-0.5B widths, bf16, B=256 x 384

A decode step at B=256 is a chain of ~200 kernels, none of which fills the GPU for its whole run: the
GEMMs are latency-bound (a few waves of tiles, K=896), attention is bandwidth-bound. Splitting the batch
into S row slices, each running the 24 layers on its own stream of one CUDA graph, lets one slice's
attention overlap another's GEMMs. The cost: every slice reads every layer's weights (L2 catches part
of it when the slices run in step) and the GEMMs run at M = B/S. The final norm and the lm_head run
once, on all rows, after the slices join.

Rows: us per step (24 layers + norm + lm_head; no sampling), per split count, with F.linear and with
the cuBLASLt-tuned GEMMs (one tuner and workspace per stream), and the logits' distance from the
one-stream step (same math per row; GEMM kernels at another M sum in another order).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import _record  # noqa: E402  (bench/_record.py: commit, command, device, date in every result file)

from forge.engine import kernels as K  # noqa: E402
from forge.engine.fused import FusedDecode  # noqa: E402
from forge.engine.timing import graph_time_us  # noqa: E402
from forge.models.args import ModelArgs  # noqa: E402
from forge.models.decoder import CausalLM  # noqa: E402


def build(layers: int, vocab: int, dev: torch.device) -> CausalLM:
    args = ModelArgs(family="qwen2", vocab_size=vocab, hidden_size=896, intermediate_size=4864,
                     num_hidden_layers=layers, num_attention_heads=14, num_key_value_heads=2,
                     attention_bias=True, rope_theta=1e6, max_position_embeddings=4096, tie_word_embeddings=True)
    with torch.device(dev):
        model = CausalLM(args)
    model.init_weights(std=0.02, seed=0)
    return model.to(torch.bfloat16).eval()


class SplitStep:
    """One decode step with rows split into `parts` slices, each on its own stream."""

    def __init__(self, fd: FusedDecode, rows: int, parts: int, tune: bool, delay_cycles: int = 0):
        from forge.engine.cublaslt import GemmTuner

        self.fd, self.parts, self.delay = fd, parts, delay_cycles
        self.bounds = [rows * j // parts for j in range(parts + 1)]
        self.streams = [torch.cuda.Stream() for _ in range(parts)]
        self.fds, self.tuners = [], []
        for j in range(parts):
            f = copy.copy(fd)
            n = self.bounds[j + 1] - self.bounds[j]
            f.reserve(n)  # its own split-attention scratch: slices run at once
            f.gemm_tuner = None
            if tune:
                t = GemmTuner(fd.embed.device, fd.embed.dtype)  # its own split-K workspace
                f.tune_gemms(n, t)
                self.tuners.append(t)
            self.fds.append(f)
        self.head_tuner = None
        if tune:
            self.head_tuner = GemmTuner(fd.embed.device, fd.embed.dtype)
            x = torch.randn(rows, fd.embed.shape[1], device=fd.embed.device).to(fd.embed.dtype)
            self.head_tuner.tune("lm_head", x, [(fd.lm_head_w, fd.lm_head_b)])

    def __call__(self, tok, pos, bt, kc, vc) -> torch.Tensor:
        cur = torch.cuda.current_stream()
        hs = []
        for j, (st, f) in enumerate(zip(self.streams, self.fds)):
            a, b = self.bounds[j], self.bounds[j + 1]
            st.wait_stream(cur)
            with torch.cuda.stream(st):
                if j and self.delay:  # offset slice j by j delays: its attention then meets slice 0's GEMMs
                    torch.cuda._sleep(j * self.delay)
                hs.append(f.forward(tok[a:b], pos[a:b], bt[a:b], kc, vc, return_hidden=True))
        for st in self.streams:
            cur.wait_stream(st)
        h = torch.cat(hs)
        _, y = K.add_rmsnorm(h, self.fd.norm, self.fd.norm_eps)
        if self.head_tuner is not None:
            return self.head_tuner.linear("lm_head", y, self.fd.lm_head_w, self.fd.lm_head_b)
        return F.linear(y, self.fd.lm_head_w, self.fd.lm_head_b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--ctx", type=int, default=384)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--parts", default="1,2,3,4")
    ap.add_argument("--delays-us", default="", help="also: 2 slices with the second one started this many us "
                    "later (a spin kernel), comma separated")
    ap.add_argument("--attn-target", default="2.0,0.5", help="kernels.ATTN_TARGET_PROGRAMS values to try "
                    "(0.5: no context splits at these batches)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = build(args.layers, args.vocab, dev)
    b, bs, hkv, d = args.batch, 64, 2, 64
    per = args.ctx // bs + 1
    nb = b * per + 1
    kc = torch.randn(args.layers, nb, bs, hkv, d, device=dev).to(torch.bfloat16)
    vc = torch.randn_like(kc)
    bt = torch.randperm(nb - 1, device=dev).add(1).int()[: b * per].view(b, per).contiguous()
    pos = torch.full((b,), args.ctx, device=dev, dtype=torch.int32)
    tok = torch.randint(0, args.vocab, (b,), device=dev)
    fd = FusedDecode(model, 4096)
    fd.reserve(b)
    res = {"device": torch.cuda.get_device_name(), "batch": b, "ctx": args.ctx, "layers": args.layers, "runs": []}
    ref = None
    for target in [float(x) for x in args.attn_target.split(",")]:
        K.ATTN_TARGET_PROGRAMS = target
        for tune in (False, True):
            for parts in [int(x) for x in args.parts.split(",")]:
                step = SplitStep(fd, b, parts, tune)
                with torch.inference_mode():
                    out = step(tok, pos, bt, kc, vc).float()
                    if ref is None:
                        ref = out
                    err = float((out - ref).abs().max() / ref.abs().max())
                    us = graph_time_us(lambda: step(tok, pos, bt, kc, vc), replays=9)
                row = {"attn_target": target, "tuned": tune, "parts": parts, "us": round(us, 1),
                       "rel_err_vs_first": err,
                       "splits_per_slice": K.attention_splits(b // parts, hkv, dev)}
                res["runs"].append(row)
                print(f"attn_target {target} tuned {tune!s:5} parts {parts}: {us:8.1f} us/step  "
                      f"(attention splits {row['splits_per_slice']}, logits rel. err {err:.2e})", flush=True)
                for t in step.tuners + ([step.head_tuner] if step.head_tuner else []):
                    t.close()
    clock_ghz = torch.cuda.get_device_properties(dev).clock_rate / 1e6 if hasattr(
        torch.cuda.get_device_properties(dev), "clock_rate") else 1.98
    for delay_us in [float(x) for x in args.delays_us.split(",") if x]:
        K.ATTN_TARGET_PROGRAMS = 0.5
        for tune in (False, True):
            step = SplitStep(fd, b, 2, tune, delay_cycles=int(delay_us * clock_ghz * 1e3))
            with torch.inference_mode():
                out = step(tok, pos, bt, kc, vc).float()
                err = float((out - ref).abs().max() / ref.abs().max())
                us = graph_time_us(lambda: step(tok, pos, bt, kc, vc), replays=9)
            res["runs"].append({"parts": 2, "tuned": tune, "delay_us": delay_us, "us": round(us, 1), "rel_err_vs_first": err})
            print(f"2 slices, second delayed {delay_us:5.1f} us, tuned {tune!s:5}: {us:8.1f} us/step (logits rel. err "
                  f"{err:.2e})", flush=True)
            for t in step.tuners + ([step.head_tuner] if step.head_tuner else []):
                t.close()
    if args.out:
        _record.write_json(args.out, res, indent=1)


if __name__ == "__main__":
    main()
