"""Training throughput: forge's decoder vs HF transformers, same shape, same run.

Qwen2.5-0.5B shape (hidden 896, 24 layers, 14 heads / 2 KV, intermediate 4864, vocab 151936, tied),
random init, batch 8 x 1024 tokens, fwd + bwd + fused AdamW. forge computes the loss with the
chunked log-prob helper (no [N, V] float32 logits); HF runs its standard `labels=` loss.

    python bench/train_throughput.py --out bench_train.json                 # H100
    python bench/train_throughput.py --packed --precision bf16,amp          # packed docs, both precisions
    python bench/train_throughput.py --smoke                                # CPU, tiny shape, 2 steps
    python bench/train_throughput.py --micro --out micro.json               # pieces: SDPA backends, log-probs, GEMMs, flex
    python bench/train_throughput.py --variants forge-compile-sdpa --profile prof/   # kernels by device time, host ops
    python bench/train_throughput.py --tp 2 --dp 2 --precision bf16           # TrainEngine on 4 ranks (FSDP2 x TP)
    python bench/train_throughput.py --smoke --tp 2                           # the same on CPU processes (gloo)

Variants: hf-eager-sdpa, forge-eager-sdpa, forge-compile-sdpa (per-block torch.compile), *-cg (the same with
CUDA graphs, mode="reduce-overhead"), *-flex (FlexAttention; with --packed a document block mask),
forge-compilefull-* (whole forward as one graph). Results and measurements: docs/perf/NOTES_train.md.

MFU = tokens/s * ModelArgs.flops_per_token(seq) / peak (6 * matmul params incl. lm_head + causal
attention; the embedding gather is not counted). `mfu_incl_emb` also counts the embedding table as
6*V*H, a convention some reports use (HF eager ~30% on H100 under it).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import _record  # noqa: E402  (bench/_record.py: commit, command, device, date in every result file)

from forge.models import CausalLM, ModelArgs, enable_activation_checkpointing, logprobs_from_hidden, maybe_compile  # noqa: E402
from forge.models.attention import make_training_attention  # noqa: E402

# *-cg: per-block compile with CUDA graphs (mode="reduce-overhead"): fixed shapes, one GPU (not with FSDP)
# forge-compilefull-*: the whole CausalLM.forward as one graph (no faster here; kept to compare)
VARIANTS = ["hf-eager-sdpa", "forge-eager-sdpa", "forge-compile-sdpa", "forge-compile-sdpa-cg", "forge-compile-flex",
            "forge-compile-flex-cg"]
ALL_VARIANTS = VARIANTS + ["forge-compilefull-sdpa", "forge-compilefull-flex"]
COMPILE_MODE: str | None = None  # --compile-mode


def qwen25_05b() -> ModelArgs:
    return ModelArgs(family="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                     num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                     rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=True)


def smoke_args() -> ModelArgs:
    return ModelArgs(family="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
                     attention_bias=True)


@dataclass
class Result:
    variant: str
    precision: str
    packed: bool
    tokens_per_s: float
    step_ms: float
    mfu: float
    mfu_incl_emb: float
    peak_mem_gib: float
    loss: float
    error: str = ""
    fwd_ms: float = 0.0  # forward + loss (device time between events, median step)
    bwd_ms: float = 0.0
    opt_ms: float = 0.0
    cpu_ms: float = 0.0  # host time to enqueue the whole step (no sync inside); ~step_ms means CPU-bound
    graphs: int = 0  # torch.compile graphs made while running this variant (recompiles show up here)
    settings: str = ""


def make_batch(args: ModelArgs, b: int, t: int, packed: bool, device, seed: int):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, args.vocab_size, (b, t), generator=g)
    if not packed:
        return tokens.to(device), None, None
    # documents of random length (mean ~t/4) packed back to back in each row; positions restart per doc
    positions, docs = torch.empty(b, t, dtype=torch.long), torch.empty(b, t, dtype=torch.long)
    for r in range(b):
        s, d = 0, 0
        while s < t:
            n = min(int(torch.randint(max(2, t // 16), max(3, t // 2), (1,), generator=g)), t - s)
            positions[r, s:s + n] = torch.arange(n)
            docs[r, s:s + n] = d
            s, d = s + n, d + 1
    return tokens.to(device), positions.to(device), docs.to(device)


def build(variant: str, args: ModelArgs, dtype: torch.dtype, device, ac: bool):
    torch.manual_seed(0)
    if variant.startswith("hf"):
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.for_model(**args.to_hf_config())
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype).to(device)
        if ac:
            model.gradient_checkpointing_enable()
        return model
    with torch.device(device):
        model = CausalLM(args)
    model.init_weights(std=0.02)
    model.to(dtype)
    enable_activation_checkpointing(model, ac)
    if "compile" in variant:
        mode = "reduce-overhead" if variant.endswith("-cg") else COMPILE_MODE
        maybe_compile(model, whole_model="compilefull" in variant, **({"mode": mode} if mode else {}))
    return model


def loss_fn(variant: str, model, tokens, positions, docs, use_flex: bool, recompute: bool, chunk_size: int = 2048):
    if variant.startswith("hf"):
        # HF has no packed-document masking under sdpa: it always runs plain causal rows
        return model(input_ids=tokens, labels=tokens).loss
    attn = make_training_attention(docs if docs is not None else torch.zeros_like(tokens) if use_flex else None,
                                   tokens.shape[1], use_flex=use_flex)
    hidden = model(tokens, positions, docs, attention=attn, return_hidden=True)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    lp, _ = logprobs_from_hidden(h, model.lm_head.weight, tokens[:, 1:].reshape(-1), chunk_size=chunk_size, recompute=recompute)
    return -lp.mean()


def run_variant(variant: str, precision: str, a, args: ModelArgs, device) -> Result:
    pure_bf16 = precision == "bf16"
    dtype = torch.bfloat16 if pure_bf16 and device.type == "cuda" else torch.float32
    model = build(variant, args, dtype, device, a.ac)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    tokens, positions, docs = make_batch(args, a.batch, a.seq, a.packed, device, seed=1)
    use_flex = "flex" in variant
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=not pure_bf16 and device.type == "cuda")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, parts, loss = [], [], float("nan")
    cuda = device.type == "cuda"
    from torch._dynamo.utils import counters

    graphs0 = counters["stats"]["unique_graphs"]

    cpu_end: list[float] = []
    cpu_times: list[float] = []

    def step_once(record: bool):
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)] if cuda else []
        if ev:
            ev[0].record()
        with autocast:
            l = loss_fn(variant, model, tokens, positions, docs, use_flex, not a.no_recompute, a.chunk_size)
        if ev:
            ev[1].record()
        l.backward()
        if ev:
            ev[2].record()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ev:
            ev[3].record()
        cpu_end.append(time.perf_counter())
        return l, ev

    for step in range(a.warmup + a.steps):
        sync()
        t0 = time.perf_counter()
        l, ev = step_once(step >= a.warmup)
        sync()
        if step >= a.warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(cpu_end[-1] - t0)
            if ev:
                parts.append([ev[i].elapsed_time(ev[i + 1]) for i in range(3)])
        loss = l.item()
    if a.profile and cuda:
        profile_steps(step_once, sync, a.profile / f"{variant}-{precision}{'-packed' if a.packed else ''}.txt")
    step_s = sorted(times)[len(times) // 2]  # median: robust to a stray slow step
    tps = a.batch * a.seq / step_s
    # packed: a token in a document of length n attends over ~n/2 tokens, so the token-weighted
    # mean document length (sum n^2 / sum n) plays the role of seq in the attention term
    seq_for_attn = a.seq
    if docs is not None:
        sizes = torch.cat([torch.bincount(r) for r in docs.cpu()]).float()
        seq_for_attn = float((sizes ** 2).sum() / sizes.sum())
    flops = args.flops_per_token(int(seq_for_attn))
    peak = a.peak_tflops * 1e12
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    del model, opt
    med = [sorted(p[i] for p in parts)[len(parts) // 2] for i in range(3)] if parts else [0.0] * 3
    return Result(variant, precision, a.packed, tps, step_s * 1e3, tps * flops / peak,
                  tps * (flops + 6 * args.vocab_size * args.hidden_size) / peak, mem, loss, "", *med,
                  sorted(cpu_times)[len(cpu_times) // 2] * 1e3 if cpu_times else 0.0,
                  counters["stats"]["unique_graphs"] - graphs0, settings(a))


def settings(a) -> str:
    import forge.models.logprobs as LP
    from forge.models import attention as A

    return (f"chunk={a.chunk_size} recompute={not a.no_recompute} gqa={A.SDPA_GQA} sdpa={A.SDPA_BACKEND} "
            f"flex_opts={A.FLEX_KERNEL_OPTIONS} lp_kernels={LP.CUDA_KERNELS} compile_mode={COMPILE_MODE}")


KERNEL_KINDS = [  # (kind, substrings of the kernel name), first match wins
    ("attention", ("flash", "fmha", "attention", "flex", "cudnn")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "matmul", "splitk", "gemv")),
    ("optimizer", ("multi_tensor", "adam", "foreach")),
    ("embedding", ("embedding", "indexing_backward", "index_put", "scatter", "gather", "sort", "radix")),
    ("triton (fused)", ("triton",)),
    ("reduce", ("reduce",)),
    ("elementwise", ("elementwise", "vectorized", "copy", "fill", "cat")),
]


def profile_steps(step_once, sync, path: Path, n: int = 2) -> None:
    """torch.profiler over n steps: kernels by device time, grouped by kind, and how busy the GPU was."""
    from torch.profiler import ProfilerActivity, profile

    path.parent.mkdir(parents=True, exist_ok=True)
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            step_once(False)
        sync()
        wall = (time.perf_counter() - t0) / n * 1e3
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels.sort(key=lambda e: e.time_range.start)
    busy, end = 0.0, None  # union of kernel intervals (us)
    for e in kernels:
        s_, e_ = e.time_range.start, e.time_range.end
        if end is None or s_ >= end:
            busy += e_ - s_
            end = e_
        elif e_ > end:
            busy += e_ - end
            end = e_
    by_kind: dict[str, float] = {}
    by_name: dict[str, list] = {}
    for e in kernels:
        name = e.name
        low = name.lower()
        kind = next((k for k, subs in KERNEL_KINDS if any(x in low for x in subs)), "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + e.time_range.elapsed_us()
        r = by_name.setdefault(name, [0.0, 0, kind])
        r[0] += e.time_range.elapsed_us()
        r[1] += 1
    lines = [f"wall {wall:.1f} ms/step, GPU busy {busy / n / 1e3:.1f} ms/step ({busy / n / 1e3 / wall:.0%}), "
             f"{len(kernels) / n:.0f} kernels/step"]
    for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {k:<16}{v / n / 1e3:8.2f} ms")
    lines.append(f"{'ms/step':>8} {'calls':>6}  kind             kernel")
    for name, (us, c, kind) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:45]:
        lines.append(f"{us / n / 1e3:8.2f} {c // n:>6}  {kind:<16} {name[:150]}")
    lines.append("host (CPU) side, top ops by self CPU time per step:")
    ka = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:25]
    for e in ka:
        lines.append(f"{e.self_cpu_time_total / n / 1e3:8.2f} ms self {e.cpu_time_total / n / 1e3:8.2f} ms total "
                     f"{e.count // n:>6}  {e.key[:110]}")
    path.write_text("\n".join(lines) + "\n")
    print(f"[profile] {path.name}: " + " | ".join(lines[: 1 + len(by_kind)]), flush=True)


def _bench_ms(fn, iters: int = 10, warmup: int = 3) -> float:
    """Median device time of fn() in ms (events around each call)."""
    for _ in range(warmup):
        fn()
    ts = []
    if not torch.cuda.is_available():  # CPU smoke of the micro path
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return sorted(ts)[len(ts) // 2]
    for _ in range(iters):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1))
    return sorted(ts)[len(ts) // 2]


def lp_check(args: ModelArgs, a, device) -> None:
    """Log-prob kernels (Triton / torch.compile / eager torch) against a float64 reference: values and grads."""
    import forge.models.logprobs as LP

    g = torch.Generator(device=device).manual_seed(123)
    n, hd, vocab = 1000, args.hidden_size, args.vocab_size
    h = (torch.randn(n, hd, device=device, generator=g)).bfloat16()
    w = (torch.randn(vocab, hd, device=device, generator=g) * 0.05).bfloat16()
    tgt = torch.randint(0, vocab, (n,), device=device, generator=g)
    ca, cb = torch.randn(n, device=device, generator=g), torch.randn(n, device=device, generator=g)
    hr, wr = h.double().requires_grad_(), w.double().requires_grad_()
    for temp in (1.0, 0.7):
        logp = ((hr @ wr.t()) / temp).log_softmax(-1)
        rlp, rent = logp.gather(-1, tgt[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)
        rgh, rgw = torch.autograd.grad((rlp * ca + rent * cb).sum(), (hr, wr))
        for kern in ("triton", "compile", "eager"):
            LP.CUDA_KERNELS = kern if kern != "eager" else "triton"
            for cs, rc in ((256, True), (4096, False)):
                h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
                lp, ent = logprobs_from_hidden(h1, w1, tgt, temp, chunk_size=cs, recompute=rc, use_compile=kern != "eager")
                gh, gw = torch.autograd.grad((lp * ca + ent * cb).sum(), (h1, w1))
                rel = lambda x, y: float((x.double() - y).norm() / y.norm())
                print(f"[lp-check] T={temp} {kern:<8} chunk={cs:<5} recompute={rc!s:<5} rel err lp {rel(lp, rlp):.1e} "
                      f"ent {rel(ent, rent):.1e} dh {rel(gh, rgh):.1e} dw {rel(gw, rgw):.1e}", flush=True)
    LP.CUDA_KERNELS = "triton"


def micro(args: ModelArgs, a, device) -> None:
    """Pieces of the step in isolation: which SDPA backend wins for GQA, log-prob chunking, GEMM rates."""
    parts = set(a.micro_parts.split(","))
    if "lpcheck" in parts:
        lp_check(args, a, device)
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from forge.models import attention as A

    out: dict[str, float | str] = {}

    def rec(key: str, fn, flops: float = 0.0):
        try:
            ms = _bench_ms(fn)
            out[key] = ms
            print(f"[micro] {key:<58}{ms:9.3f} ms" + (f"  {flops / ms / 1e9:7.0f} TFLOP/s" if flops else ""), flush=True)
        except Exception as e:  # unsupported backend etc.
            out[key] = f"{type(e).__name__}: {str(e)[:160]}"
            print(f"[micro] {key:<58}  FAILED {out[key]}", flush=True)
        torch.cuda.empty_cache()

    b, t, hq, hkv, d = a.batch, a.seq, args.num_attention_heads, args.num_key_value_heads, args.head_dim
    g = torch.Generator(device=device).manual_seed(0)
    mk = lambda *shape: torch.randn(*shape, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
    q, k, v = mk(b, hq, t, d), mk(b, hkv, t, d), mk(b, hkv, t, d)
    go = torch.randn(b, hq, t, d, device=device, dtype=torch.bfloat16, generator=g)
    if device.type != "cuda":
        torch.cuda.reset_peak_memory_stats = torch.cuda.max_memory_allocated = lambda *a, **k: 0
    attn_flops = 3.5 * 4 * b * hq * t * t * d / 2  # causal fwd+bwd
    ke, ve = (x.detach().repeat_interleave(hq // hkv, 1).requires_grad_() for x in (k, v))

    def sdpa_step(kk, vv, gqa, backend):
        def f():
            ctx = sdpa_kernel([backend]) if backend is not None else torch.enable_grad()
            with ctx:
                o = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)
            o.backward(go)
        return f

    for name, be in [] if "attn" not in parts else [("default", None), ("flash", SDPBackend.FLASH_ATTENTION),
                                                     ("cudnn", SDPBackend.CUDNN_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("math", SDPBackend.MATH)]:
        rec(f"sdpa fwd+bwd gqa-native {name}", sdpa_step(k, v, True, be), attn_flops)
        rec(f"sdpa fwd+bwd gqa-expanded {name}", sdpa_step(ke, ve, False, be), attn_flops)
    # which backend does the default pick?
    from torch.profiler import ProfilerActivity, profile

    for name, kk, vv, gqa in [("native", k, v, True), ("expanded", ke, ve, False)] if device.type == "cuda" and "attn" in parts else []:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            sdpa_step(kk, vv, gqa, None)()
            torch.cuda.synchronize()
        names = sorted({e.name[:90] for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA})
        out[f"sdpa default kernels {name}"] = " ; ".join(names)
        print(f"[micro] sdpa default kernels ({name}): {names}", flush=True)

    # log-probs: lm_head + log-softmax fwd+bwd over the batch's tokens
    n, hd, vocab = b * t - b, args.hidden_size, args.vocab_size
    h0 = torch.randn(n, hd, device=device, dtype=torch.bfloat16, generator=g)
    w0 = torch.randn(vocab, hd, device=device, dtype=torch.bfloat16, generator=g) * 0.02
    tgt = torch.randint(0, vocab, (n,), device=device, generator=g)
    lp_flops = 2 * n * hd * vocab
    for prec in ("bf16", "amp") if "lp" in parts else ():
        dt = torch.bfloat16 if prec == "bf16" else torch.float32
        h1, w1 = h0.to(dt).requires_grad_(), w0.to(dt).requires_grad_()
        for cs in (1024, 2048, 4096, 8192):
            for recompute in (True, False):
                def f(cs=cs, recompute=recompute, h1=h1, w1=w1, prec=prec):
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=prec == "amp"):
                        lp, _ = logprobs_from_hidden(h1, w1, tgt, chunk_size=cs, recompute=recompute)
                    (-lp.mean()).backward()
                    h1.grad = w1.grad = None
                torch.cuda.reset_peak_memory_stats()
                rec(f"logprobs {prec} chunk={cs} recompute={recompute}", f, lp_flops * (4 if recompute else 3))
                out[f"logprobs {prec} chunk={cs} recompute={recompute} peak GiB"] = torch.cuda.max_memory_allocated() / 2**30

    # GEMM rates at the layer's shapes (m = tokens)
    m, i_ = b * t, args.intermediate_size
    for (mm_, kk_, nn_) in [(m, hd, i_), (m, i_, hd), (i_, m, hd), (m, hd, hd), (m, hd, 128), (hd, m, 128),
                            (m, hd, 2 * i_), (2048, hd, vocab), (8192, hd, vocab), (8192, vocab, hd), (vocab, 8192, hd)
                            ] if "gemm" in parts else []:
        x = torch.randn(mm_, kk_, device=device, dtype=torch.bfloat16, generator=g)
        y = torch.randn(kk_, nn_, device=device, dtype=torch.bfloat16, generator=g)
        rec(f"gemm {mm_}x{kk_} @ {kk_}x{nn_}", lambda x=x, y=y: x @ y, 2 * mm_ * kk_ * nn_)
    # FlexAttention: causal (one document) and packed documents, default and a few kernel options
    _, _, docs = make_batch(args, b, t, True, device, seed=1)
    qf, kf, vf = (x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for x in (q, k, v))
    flex = A._compiled_flex()
    for label, dd in [("causal", torch.zeros_like(docs)), ("packed", docs)] if device.type == "cuda" and "flex" in parts else []:
        mm = lambda bi, h, qi, ki, dd=dd: (qi >= ki) & (dd[bi, qi] == dd[bi, ki])
        bm = A.document_block_mask(dd, mm)
        rec(f"flex block mask build ({label})", lambda dd=dd, mm=mm: A.document_block_mask(dd, mm))
        for opts in [None, {"BLOCK_M": 64, "BLOCK_N": 128}, {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_M1": 64, "BLOCK_N1": 128,
                                                                 "BLOCK_M2": 128, "BLOCK_N2": 64}]:
            def f(bm=bm, opts=opts):
                o = flex(qf, kf, vf, block_mask=bm, enable_gqa=True, kernel_options=opts)
                o.backward(go)
            rec(f"flex fwd+bwd {label} {json.dumps(opts) if opts else 'default'}", f, attn_flops if label == "causal" else 0)

    if a.out:
        _record.write_json(a.out, out, indent=1)


def main(argv: list[str] | None = None) -> list[Result]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shape, 2 steps, runs on CPU in seconds")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--precision", default="bf16", help="comma list of bf16 (pure bf16 params) / amp (fp32 params + autocast)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--packed", action="store_true", help="several documents per row (forge variants mask across docs)")
    p.add_argument("--ac", action="store_true", help="activation checkpointing on every layer")
    p.add_argument("--no-recompute", action="store_true", help="keep chunk logits (bf16) for backward instead of recomputing")
    p.add_argument("--chunk-size", type=int, default=8192,
                   help="lm_head/log-softmax chunk (tokens); >= batch tokens = one chunk, logits kept for backward")
    p.add_argument("--gqa", choices=["native", "expand"], default=None, help="SDPA grouped-query handling on CUDA")
    p.add_argument("--sdpa-backend", choices=["flash", "cudnn", "efficient", "math"], default=None)
    p.add_argument("--lp-kernels", choices=["triton", "compile"], default=None, help="log-prob element-wise kernels")
    p.add_argument("--flex-opts", default=None, help="FlexAttention kernel_options as JSON")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode for the compiled variants")
    p.add_argument("--profile", type=Path, default=None, help="directory: torch.profiler summary per variant")
    p.add_argument("--micro", action="store_true", help="micro-benchmarks (attention backends, log-prob chunking, GEMMs)")
    p.add_argument("--micro-parts", default="lpcheck,attn,lp,gemm,flex")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM bf16 dense")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree: run forge's TrainEngine on tp*dp processes")
    p.add_argument("--dp", type=int, default=1, help="FSDP2 (data-parallel shard) degree, with --tp")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    variants = [v for v in a.variants.split(",") if v]
    unknown = set(variants) - set(ALL_VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {ALL_VARIANTS}")
    if a.smoke:
        args = smoke_args()
        a.batch, a.seq, a.steps, a.warmup = 2, 64, 2, 1
        if device.type == "cpu":  # inductor/flex on CPU would spend minutes compiling
            variants = [v for v in variants if "compile" not in v]
    else:
        args = qwen25_05b()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    from forge.models import attention as A

    global COMPILE_MODE
    COMPILE_MODE = a.compile_mode
    if a.gqa:
        A.SDPA_GQA = a.gqa
    if a.sdpa_backend:
        A.SDPA_BACKEND = a.sdpa_backend
    if a.lp_kernels:
        import forge.models.logprobs as LP

        LP.CUDA_KERNELS = a.lp_kernels
    if a.flex_opts:
        A.FLEX_KERNEL_OPTIONS = json.loads(a.flex_opts)
    if a.micro:
        micro(args, a, device)
        return []
    if a.tp > 1 or a.dp > 1:
        return _parallel(args, a, device, p)
    results = []
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"

    def write_json():
        if a.out:  # rewritten after every variant, so a run cut short keeps what it measured
            _record.write_json(a.out, {"device": dev_name, "model_args": asdict(args), "batch": a.batch, "seq": a.seq,
                                         "steps": a.steps, "peak_tflops": a.peak_tflops, "torch": torch.__version__,
                                         "results": [asdict(r) for r in results]}, indent=2)

    for prec in a.precision.split(","):
        for v in variants:
            try:
                results.append(run_variant(v, prec, a, args, device))
            except Exception as e:  # one failing variant (e.g. OOM) must not hide the others
                results.append(Result(v, prec, a.packed, 0, 0, 0, 0, 0, float("nan"), f"{type(e).__name__}: {e}"[:300]))
            r = results[-1]
            print(f"[done] {v} {prec}: {r.step_ms:.1f} ms/step {r.mfu_incl_emb:.1%} MFU* {r.error}", flush=True)
            write_json()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"\n{args.num_params() / 1e6:.0f}M params, {a.batch}x{a.seq} tokens, {dev_name}, packed={a.packed}, ac={a.ac}")
    print(f"{'variant':<23}{'prec':<6}{'tok/s':>9}{'step ms':>9}{'MFU':>7}{'MFU*':>7}{'mem GiB':>9}{'loss':>9}"
          f"{'fwd':>7}{'bwd':>7}{'opt':>6}{'cpu':>7}{'graphs':>7}")
    for r in results:
        if r.error:
            print(f"{r.variant:<23}{r.precision:<6}  FAILED {r.error}")
        else:
            print(f"{r.variant:<23}{r.precision:<6}{r.tokens_per_s:>9.0f}{r.step_ms:>9.1f}{r.mfu:>7.1%}"
                  f"{r.mfu_incl_emb:>7.1%}{r.peak_mem_gib:>9.1f}{r.loss:>9.3f}{r.fwd_ms:>7.1f}{r.bwd_ms:>7.1f}"
                  f"{r.opt_ms:>6.1f}{r.cpu_ms:>7.1f}{r.graphs:>7}")
    print("MFU* counts the embedding table as matmul FLOPs too (6*V*H per token); fwd/bwd/opt: device ms between events "
          "(fwd includes the loss); cpu: host ms to enqueue the step (near step ms = host-bound)")
    if a.out:
        write_json()
        print(f"wrote {a.out}")
    return results


def _parallel(args: ModelArgs, a, device, p: argparse.ArgumentParser) -> list:
    """--tp/--dp: forge's TrainEngine (eager, SFT steps) on tp*dp processes; the variants do not apply."""
    from _train_parallel import run_parallel

    if a.tp < 1 or a.dp < 1:
        p.error(f"--tp {a.tp} --dp {a.dp}: degrees must be >= 1")
    if a.variants != ",".join(VARIANTS) or a.packed or a.profile:
        p.error("--tp/--dp time forge's TrainEngine (eager); --variants, --packed and --profile do not apply to them")
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    results = []
    for prec in a.precision.split(","):
        try:
            r = run_parallel(args, a.tp, a.dp, prec, a, device)
        except Exception as e:  # report the failure in the result file, like a failing variant
            from _train_parallel import ParallelResult

            r = ParallelResult(a.tp, a.dp, prec, 0.0, 0.0, float("nan"), 0.0, f"{type(e).__name__}: {e}"[:300])
        results.append(r)
        print(f"TrainEngine tp={r.tp} dp={r.dp} {prec}: {r.tokens_per_s:.0f} tok/s, {r.step_ms:.1f} ms/step, "
              f"loss {r.loss:.3f}, peak {r.peak_mem_gib:.1f} GiB {r.error}", flush=True)
    if a.out:
        _record.write_json(a.out, {"device": dev_name, "model_args": asdict(args), "batch": a.batch, "seq": a.seq,
                                   "steps": a.steps, "tp": a.tp, "dp": a.dp, "torch": torch.__version__,
                                   "results": [asdict(r) for r in results]}, indent=2)
        print(f"wrote {a.out}")
    return results


if __name__ == "__main__":
    main()
