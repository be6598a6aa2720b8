"""Generation throughput: forge's engine vs HF `generate` vs the memory-bandwidth bound.

    python bench/generate_throughput.py --out gen.json          # one GPU, Qwen2.5-0.5B shape, bf16
    python bench/generate_throughput.py --smoke                 # CPU, tiny shape, seconds
    python bench/generate_throughput.py --variants all --profile --out gen.json
        # + the engine with each optimisation switched on in turn, and where a decode step's time goes
    python bench/generate_throughput.py --tp 2 --out gen_tp2.json   # the engine tensor-parallel over 2 GPUs
    python bench/generate_throughput.py --tp 2 --smoke              # the same over 2 CPU processes (gloo)

--tp N: the forge measurement runs in N processes (one GPU each; gloo on CPU), rank 0 scheduling and
sampling, the others following (forge.engine.tp); the bound and the roofline stay those of the whole
model on one device.

Random weights (throughput does not depend on their values), random prompts, sampling at
temperature 1 with EOS ignored, so every sequence generates exactly --new-tokens tokens.
forge: all --num-seqs requests submitted at once, wall time from submission to the last token
(prefill included). HF: `generate(do_sample=True)` on --hf-batch sequences (fewer new tokens
to keep it short; reported per second). Bound: every decode step must read all weights once
plus each sequence's KV cache (average context = prompt + new/2), at the measured device copy
bandwidth: bound tok/s = bandwidth / (weight bytes + batch * avg_ctx * kv bytes/token) * batch.
Roofline (printed beside it): the weight GEMMs take at least max(weight bytes / bandwidth, 2 * batch *
weight elements / measured GEMM peak), plus the KV read; at B=256 on an H200 the GEMMs are compute-bound
(256 FLOP per weight byte, above its ridge point), so there the roofline is the tighter of the two.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from forge.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from forge.engine.attention import AttnMeta  # noqa: E402
from forge.models.args import ModelArgs  # noqa: E402
from forge.models.decoder import CausalLM  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _record  # noqa: E402  (bench/_record.py: commit, command, device, date in every result file)
from kernel_settings import apply as apply_kernel_settings  # noqa: E402
from kernel_settings import parse as parse_kernel_settings  # noqa: E402


def qwen25_05b(smoke: bool) -> ModelArgs:
    if smoke:
        return ModelArgs(family="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                         max_position_embeddings=1024, tie_word_embeddings=True)
    return ModelArgs(family="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                     num_attention_heads=14, num_key_value_heads=2, attention_bias=True, rope_theta=1000000.0,
                     max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def copy_bandwidth(dev: torch.device, nbytes: int) -> float:
    """Bytes moved (read + write) per second by a large device-to-device copy."""
    x = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync(dev)
    iters = 20
    t0 = time.perf_counter()
    for _ in range(iters):
        y.copy_(x)
    sync(dev)
    return 2 * nbytes * iters / (time.perf_counter() - t0)


def gemm_peak_flops(dev: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul: what the GEMMs of a decode step could reach at best."""
    n = 8192 if dev.type == "cuda" else 512
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    for _ in range(3):
        a @ b
    sync(dev)
    iters = 20
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(dev)
    return 2 * n ** 3 * iters / (time.perf_counter() - t0)


def build_model(args: ModelArgs, dev: torch.device, dtype: torch.dtype) -> CausalLM:
    with torch.device(dev):
        model = CausalLM(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
    return model.to(dtype).eval()


# engine settings per variant: each switches on one more optimisation (docs/perf/NOTES_generate.md)
VARIANTS = {
    "baseline": dict(fused_decode=False, fast_sampler=False, overlap_decode=False),
    "fused": dict(fused_decode=True, fast_sampler=True, overlap_decode=False, fused_prefill=False),
    "fused+overlap": dict(fused_prefill=False),
    "fused+overlap+prefill": dict(prefill_cuda_graphs=False),
    # kernel-config alternatives (module attributes of forge.engine.kernels), e.g.
    # "attn-2blocks": dict(kernels=dict(ATTN_BLOCKS=2, ATTN_WARPS=8)) (slower on the H100: docs/perf/NOTES_generate.md)
    # one program per (sequence, kv head), the attention before flash-decoding splits (same at B=256;
    # compare at a long context: --num-seqs 16 --new-tokens 4096)
    "no-split": dict(kernels=dict(ATTN_MAX_SPLITS=1)),
    # prefill steps read their first tokens before the next prompts' prefill is queued (as before 2026-11-29)
    "no-prefill-overlap": dict(overlap_prefill=False),
    # a decode batch that lost rows (sequences stopped) drains the in-flight step and re-uploads its state
    # instead of going on from the device state (as before 2026-11-29; matters with --random-lengths)
    "no-compaction": dict(engine_attrs=dict(compact_in_flight=False)),
    # decode GEMMs with F.linear's cuBLAS pick instead of the fastest cuBLASLt candidate (before 2026-11-29)
    "no-gemm-tuning": dict(tune_gemms=False),
    # the decode after a prefill waits for the prefill's first tokens to be read (a drain per arrival; before
    # 2026-11-29 evening): matters with --arrival-waves
    "no-decode-join": dict(engine_attrs=dict(join_prefilled=False)),
    # the decode step with its 48 RMSNorm launches (norm weights not folded into the projections; before 2026-11-29)
    "no-norm-folding": dict(fold_norms=False),
    "defaults": dict(),  # fused decode + overlap + fused prefill in CUDA graphs: the main run, again, warm
}


def engine_config(o, dev, dtype, **over) -> EngineConfig:
    max_len = o.prompt_len + o.new_tokens
    kw = dict(max_num_seqs=o.num_seqs, max_model_len=max_len, block_size=o.block_size,
              kv_cache_tokens=o.num_seqs * max_len, max_num_batched_tokens=max(4096, 4 * o.prompt_len),
              dtype=dtype, device=dev, enable_cuda_graphs=not o.no_graphs, attention_backend=o.attention)
    kw.update(over)
    return EngineConfig(**kw)


def bench_forge(args, model, dev, dtype, o, kernels: dict | None = None, engine_attrs: dict | None = None,
                **over) -> dict:
    from forge.engine import kernels as K

    saved = {k: getattr(K, k) for k in kernels or {}}
    for k, v in (kernels or {}).items():
        setattr(K, k, v)
    try:
        return _bench_forge(args, model, dev, dtype, o, engine_attrs or {}, **over)
    finally:
        for k, v in saved.items():
            setattr(K, k, v)


def _bench_forge(args, model, dev, dtype, o, engine_attrs: dict, **over) -> dict:
    cfg = engine_config(o, dev, dtype, **over)
    t0 = time.perf_counter()
    eng = LLMEngine(model, cfg, eos_token_ids=[])
    for k, v in engine_attrs.items():
        setattr(eng, k, v)
    setup_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    sp = SamplingParams(temperature=1.0, max_tokens=o.new_tokens, ignore_eos=True)
    warm = [(torch.randint(0, args.vocab_size, (o.prompt_len,), generator=g), sp.replace(max_tokens=8))
            for _ in range(min(8, o.num_seqs))]
    eng.generate(warm)
    lens = [o.new_tokens] * o.num_seqs
    if o.random_lengths:  # an RL rollout's spread of answer lengths: the batch shrinks as sequences stop
        lens = torch.randint(o.new_tokens // 8, o.new_tokens + 1, (o.num_seqs,), generator=g).tolist()
    reqs = [(torch.randint(0, args.vocab_size, (o.prompt_len,), generator=g), sp.replace(max_tokens=n)) for n in lens]
    sync(dev)
    eng.stats.update(prefill_tokens=0, decode_tokens=0, steps=0, overlapped_steps=0, prefills_ahead_of_decode=0,
                     decodes_joining_prefill=0)
    # --arrival-waves K: the requests come in K waves, one every new_tokens / K engine steps (an RL app's
    # rollout workers submitting groups while others decode); 1: all at once
    waves = max(1, o.arrival_waves)
    per_wave, gap = -(-len(reqs) // waves), max(1, o.new_tokens // waves)
    t0 = time.perf_counter()
    ids = [eng.add_request(p, q) for p, q in reqs[:per_wave]]
    got, steps = {}, []  # (seconds, was a prefill step) per engine step
    while eng.has_unfinished() or len(ids) < len(reqs):
        if len(steps) % gap == 0 and len(ids) < len(reqs) and steps:
            ids += [eng.add_request(p, q) for p, q in reqs[len(ids):len(ids) + per_wave]]
        pre, ts = eng.stats["prefill_tokens"], time.perf_counter()
        for out in eng.step():
            got[out.request_id] = out
        steps.append((time.perf_counter() - ts, eng.stats["prefill_tokens"] > pre))
    outs = [got[i] for i in ids]
    sync(dev)
    dt = time.perf_counter() - t0
    n = sum(len(s.token_ids) for r in outs for s in r.outputs)
    assert n == sum(lens), f"expected {sum(lens)} tokens, got {n}"
    r = eng.runner
    res = {"tokens": n, "seconds": dt, "tokens_per_s": n / dt, "setup_s": setup_s, "steps": eng.stats["steps"],
           "attention": "fused-triton" if r.fused is not None else ("triton" if r.use_triton else "torch"),
           "fused_decode": r.fused is not None, "fast_sampler": eng.sampler.fast,
           "overlapped_steps": eng.stats["overlapped_steps"], "cuda_graphs": sorted(r.graphs),
           "prefills_ahead_of_decode": eng.stats["prefills_ahead_of_decode"],
           "decodes_joining_prefill": eng.stats["decodes_joining_prefill"],
           "kv_bytes_per_token": r.kv_bytes_per_token(), "preemptions": eng.scheduler.num_preemptions,
           "logprob_mean": sum(x for rr in outs for s in rr.outputs for x in s.logprobs) / n,
           "gemm_tuning": r.gemm_tuner.summary() if r.gemm_tuner is not None else None}
    dec = sorted(t for t, p in steps if not p)
    res["prefill_s"] = sum(t for t, p in steps if p)
    res["prefill_steps_ms"] = [round(t * 1e3, 2) for t, p in steps if p]  # the first pays any graph capture
    res["prefill_captures"] = r.prefill_capture_log
    res["decode_s"] = sum(dec)
    res["decode_step_ms_median"] = dec[len(dec) // 2] * 1e3 if dec else None
    res["decode_step_ms_max"] = dec[-1] * 1e3 if dec else None
    eng.shutdown()  # tensor parallel: releases the other ranks
    del eng
    return res


def bench_forge_tp(args: ModelArgs, dev: torch.device, dtype: torch.dtype, o) -> dict:
    """`bench_forge` with the engine tensor-parallel over `o.tp` processes (ranks 1.. follow rank 0)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_tp_rank, args=(r, port, args, dev.type, dtype, o, q)) for r in range(o.tp)]
    for p in procs:
        p.start()
    try:
        res = q.get(timeout=3600)
    finally:
        for p in procs:
            p.join(60)
    if "error" in res:
        raise RuntimeError(f"tensor-parallel rank 0 failed:\n{res['error']}")
    res["tensor_parallel_size"] = o.tp
    return res


def _tp_rank(rank: int, port: int, args: ModelArgs, dev_type: str, dtype: torch.dtype, o, q) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(o.tp), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dev = torch.device("cuda", rank) if dev_type == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // o.tp))
    torch.manual_seed(0)  # the same weights on every rank: each keeps its shard
    model = build_model(args, dev, dtype)
    try:
        if rank == 0:
            q.put(bench_forge(args, model, dev, dtype, o, tensor_parallel_size=o.tp))
        else:
            LLMEngine(model, engine_config(o, dev, dtype, tensor_parallel_size=o.tp), eos_token_ids=[]).follow()
    except Exception:  # rank 0 reports; the others die with it
        if rank == 0:
            q.put({"error": traceback.format_exc(limit=8)})
        raise
    import torch.distributed as dist

    dist.destroy_process_group()


def _graph_ms(fn, reps: int = 20) -> float:
    """Device time of one fn() call in ms: `reps` calls captured in a CUDA graph, median of 5 replays
    (no launch gaps: what the calls cost inside the decode graph)."""
    from forge.engine.timing import graph_time_us

    return graph_time_us(fn, calls=reps) / 1e3


def _time_ms(fn, iters: int = 30) -> float:
    """Median device time of fn() in ms (CUDA events), after warm-up."""
    for _ in range(3):
        fn()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]


def _attention_splits_sweep(q, k, v, kc, vc, tables, pos, cos, sin, a, kv_bytes, splits=(1, 2, 3, 4, 8)) -> list:
    from forge.engine import kernels as K

    rows = []
    for sp in splits:
        ws = K.AttentionWorkspace(q.shape[0], a.num_attention_heads, a.num_key_value_heads, a.head_dim, q.device,
                                  splits=sp)
        ms = _graph_ms(lambda: K.attention(q, k, v, kc, vc, tables, pos, cos, sin, a.num_attention_heads,
                                           splits=sp, workspace=ws))
        rows.append((sp, round(ms * 1e3, 2), round(kv_bytes / ms / 1e6)))
    return rows  # (splits, us, GB/s)


@torch.inference_mode()
def gemm_layouts(b: int, lw, lm_head_w, a: ModelArgs, dev, dtype) -> dict:
    """The decode GEMMs at batch b in other formulations cuBLAS may tile better: x @ W^T as stored
    (F.linear, TN), against a pre-transposed weight (NN), as (W @ x^T)^T (the small batch becomes
    the GEMM's N), and through the cuBLAS (not cuBLASLt) backend. us per call, graph-timed."""
    import torch.nn.functional as F

    nq = a.num_attention_heads * a.head_dim
    shapes = {"qkv": (a.hidden_size, lw.qkv_w), "o": (nq, lw.o_w), "gate_up": (a.hidden_size, lw.gu_w),
              "down": (a.intermediate_size, lw.down_w), "lm_head": (a.hidden_size, lm_head_w)}
    out = {}
    for name, (k, w) in shapes.items():
        x = torch.randn(b, k, device=dev).to(dtype)
        wt = w.t().contiguous()
        row = {"linear": _graph_ms(lambda: F.linear(x, w)), "nn": _graph_ms(lambda: torch.mm(x, wt)),
               "swapped": _graph_ms(lambda: torch.mm(w, x.t()))}
        prev = torch.backends.cuda.preferred_blas_library()
        try:
            torch.backends.cuda.preferred_blas_library("cublas")
            row["linear_cublas"] = _graph_ms(lambda: F.linear(x, w))
        except Exception as e:  # noqa: BLE001
            row["linear_cublas"] = repr(e)[:60]
        finally:
            torch.backends.cuda.preferred_blas_library(prev)
        out[name] = {k_: (round(v * 1e3, 2) if isinstance(v, float) else v) for k_, v in row.items()}
        del wt
    return out


@torch.inference_mode()
def attention_long_context(a: ModelArgs, dev, dtype, batch: int = 16, context: int = 4096, bs: int = 64) -> dict:
    """One layer's decode attention at `batch` rows x `context` cached tokens on a random paged cache
    (block order shuffled), by number of context splits; checked against splits=1."""
    from forge.engine import kernels as K

    d, hkv, hq = a.head_dim, a.num_key_value_heads, a.num_attention_heads
    per = -(-(context + 1) // bs)
    nb = batch * per + 1
    kc = torch.randn(nb, bs, hkv, d, device=dev).to(dtype)
    vc = torch.randn(nb, bs, hkv, d, device=dev).to(dtype)
    tables = (torch.randperm(nb - 1, device=dev)[: batch * per] + 1).view(batch, per).int()
    pos = torch.full((batch,), context, dtype=torch.int32, device=dev)
    qkv = torch.randn(batch, (hq + 2 * hkv) * d, device=dev).to(dtype)
    q, k, v = qkv[:, : hq * d], qkv[:, hq * d: (hq + hkv) * d], qkv[:, (hq + hkv) * d:]
    inv = 1.0 / (a.rope_theta ** (torch.arange(0, d, 2, device=dev).float() / d))
    fr = torch.outer(torch.arange(context + 1, device=dev).float(), inv)
    cos, sin = torch.cat([fr, fr], -1).cos(), torch.cat([fr, fr], -1).sin()
    kv_bytes = batch * context * 2 * hkv * d * torch.finfo(dtype).bits // 8
    ref = K.attention(q, k, v, kc.clone(), vc.clone(), tables, pos, cos, sin, hq, splits=1)
    errs = {}
    for sp in (2, 8):
        o = K.attention(q, k, v, kc.clone(), vc.clone(), tables, pos, cos, sin, hq, splits=sp)
        errs[sp] = ((o.float() - ref.float()).norm() / ref.float().norm()).item()
    return {"batch": batch, "context": context, "default_splits": K.attention_splits(batch, hkv, dev),
            "rel_err_vs_1_split": errs,
            "us_by_splits": _attention_splits_sweep(q, k, v, kc, vc, tables, pos, cos, sin, a, kv_bytes,
                                                    splits=(1, 2, 4, 8, 16))}


@torch.inference_mode()
def _kernel_table(fn, dev, calls: int = 3) -> list:
    """(ms per call, launches per call, kernel name) of every kernel fn() runs, largest first (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        sync(dev)
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append((t / calls / 1e3, e.count // calls, e.key[:90]))
    return sorted(rows, reverse=True)


def profile_forge(args, model, dev, dtype, o) -> dict:
    """Where one decode step at batch num_seqs and context ~prompt + new/2 spends its time."""
    import torch.nn.functional as F

    from forge.engine import kernels as K

    eng = LLMEngine(model, engine_config(o, dev, dtype), eos_token_ids=[])
    r = eng.runner
    g = torch.Generator().manual_seed(2)
    sp = SamplingParams(temperature=1.0, max_tokens=o.new_tokens, ignore_eos=True)
    for _ in range(o.num_seqs):
        eng.add_request(torch.randint(0, args.vocab_size, (o.prompt_len,), generator=g), sp)
    while eng.scheduler.waiting or eng.stats["decode_tokens"] < o.num_seqs * (o.new_tokens // 2 - 32):
        eng.step()
    sync(dev)
    # host + device per engine step (overlapped), 32 steps
    t0 = time.perf_counter()
    for _ in range(32):
        eng.step()
    sync(dev)
    out = {"engine_step_ms": (time.perf_counter() - t0) / 32 * 1e3}
    if eng._pending is not None:
        eng._consume(eng._pending, [])
        eng._pending = None
    b = len(eng.scheduler.running)
    out["batch"], out["context"] = b, eng.scheduler.running[0].num_computed
    if r.fused is None:
        return out
    graph = r.graphs.get(b, (None,))[0]
    if graph is not None:
        out["graph_replay_ms"] = _time_ms(graph.replay)
    out["eager_fused_step_ms"] = _time_ms(lambda: r._fused_step(b), 10)
    rows = _kernel_table(lambda: r._fused_step(b), dev)
    out["kernels_ms_per_step"] = rows[:25]
    out["kernels_total_ms"] = sum(x[0] for x in rows)
    # prefill: one step of 4096 tokens (32 prompts) through the fused path vs the model's modules
    # (measured by the variants' prefill_s); here the decode-side sweeps, graph-timed
    # attention configurations on the live cache (layer 0)
    a = model.args
    nq, nk = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
    qkv = torch.randn(b, nq + 2 * nk, device=dev).to(dtype)
    q, k, v = qkv[:, :nq], qkv[:, nq:nq + nk], qkv[:, nq + nk:]
    tables, pos = r.st_tables[:b], r.st_pos[:b]
    kv_bytes = pos.double().sum().item() * 2 * nk * torch.finfo(dtype).bits // 8
    att = []
    for tn, nw, ns in [(64, 4, 2), (64, 4, 3), (64, 2, 2), (128, 4, 2), (128, 4, 3), (128, 8, 2), (128, 8, 3),
                       (128, 8, 4)]:
        try:
            ms = _graph_ms(lambda: K.attention(q, k, v, r.k_cache[0], r.v_cache[0], tables, pos, r.fused.cos, r.fused.sin,
                                               a.num_attention_heads, tokens=tn, num_warps=nw, num_stages=ns))
            att.append((ms * 1e3, tn, nw, ns, kv_bytes / ms / 1e9 * 1e3))
        except Exception as e:  # noqa: BLE001
            att.append((float("inf"), tn, nw, ns, repr(e)[:60]))
    att.sort(key=lambda x: x[0])
    out["attention_us_tn_warps_stages_GBps"] = att[:12]
    # flash-decoding: context splits at this batch, and at a long-context small batch (an RL
    # rollout's tail: few sequences, thousands of tokens each), where one program per
    # (sequence, kv head) leaves most SMs idle
    out["attention_splits_default"] = K.attention_splits(b, a.num_key_value_heads, dev)
    out["attention_us_by_splits"] = _attention_splits_sweep(q, k, v, r.k_cache[0], r.v_cache[0], tables, pos,
                                                            r.fused.cos, r.fused.sin, a, kv_bytes)
    out["attention_long_context"] = attention_long_context(a, dev, dtype)
    # sampler: fused kernels vs the torch path, on [b, V] logits
    from forge.engine.sampler import SamplingBatch

    logits = torch.randn(b, a.vocab_size, device=dev).to(dtype)
    sb = SamplingBatch.build([(1.0, 0, 1.0, 0.0, i, 0, 5, False) for i in range(b)], dev)
    smp = []
    for cfg in [(2048, 4, 8), (4096, 2, 8), (4096, 2, 16), (4096, 4, 8), (2048, 2, 8), (1024, 8, 4), (8192, 1, 16)]:
        smp.append((round(_graph_ms(lambda: K.sample(logits, sb.temperature, sb.seed, sb.stream, sb.counter,
                                                     cfg=cfg)) * 1e3, 1), cfg))
    out["sample_us_cfg"] = sorted(smp)
    fast, eng.sampler.fast = eng.sampler.fast, False
    out["sample_torch_us"] = _time_ms(lambda: eng.sampler(logits, sb), 10) * 1e3
    eng.sampler.fast = fast
    # the GEMMs of one layer and lm_head at batch b
    lw = r.fused.layers[0]
    x = torch.randn(b, a.hidden_size, device=dev).to(dtype)
    xi = torch.randn(b, a.intermediate_size, device=dev).to(dtype)
    xo = torch.randn(b, nq, device=dev).to(dtype)
    gemm = {}
    for name, inp, w, bias in [("qkv", x, lw.qkv_w, lw.qkv_b), ("o", xo, lw.o_w, lw.o_b), ("gate_up", x, lw.gu_w, lw.gu_b),
                               ("down", xi, lw.down_w, lw.down_b), ("lm_head", x, r.fused.lm_head_w, None)]:
        ms = _graph_ms(lambda: F.linear(inp, w, bias))
        gemm[name] = (ms * 1e3, w.numel() * w.element_size() / ms / 1e6)
    out["gemm_us_GBps"] = gemm
    out["gemm_layouts_us"] = gemm_layouts(b, lw, r.fused.lm_head_w, a, dev, dtype)
    # prefill of one 4096-token chunk: the captured graph vs the same kernels launched eagerly
    entry = next(iter(r._prefill_graphs.values()), None)
    if entry is not None:
        tok_s, pos_s, slot_s, last_s, pg, _ = entry
        meta = AttnMeta(slot_mapping=slot_s, block_tables=None, context_lens=None, decode=False, has_prefix=False)
        out["prefill_shape"] = list(tok_s.shape)
        out["prefill_graph_ms"] = _time_ms(pg.replay, 10)
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(5):
            r.fused.prefill(tok_s, pos_s, slot_s, last_s, meta, r.k_cache, r.v_cache)
        sync(dev)
        out["prefill_eager_ms"] = (time.perf_counter() - t0) / 5 * 1e3
        rows = _kernel_table(lambda: r.fused.prefill(tok_s, pos_s, slot_s, last_s, meta, r.k_cache, r.v_cache), dev)
        out["prefill_kernels_ms"] = rows[:20]
        out["prefill_kernels_total_ms"] = sum(x[0] for x in rows)
    del eng
    return out


def bench_hf(args: ModelArgs, dev, dtype, o) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**args.to_hf_config())
    with torch.device(dev):
        try:
            hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
        except TypeError:  # transformers < 4.56 spells it torch_dtype
            hf = AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype, attn_implementation="sdpa")
    hf = hf.to(dev, dtype).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, args.vocab_size, (o.hf_batch, o.prompt_len), generator=g).to(dev)
    kw = dict(attention_mask=torch.ones_like(x), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
              eos_token_id=None, pad_token_id=0)
    # HF's first generate of a given length runs ~3x slower than the next one on an H200 (1.1k vs 3.3k tok/s:
    # first-use costs at every new cache length). The reported figure is the second, warm run, as forge's engine
    # is warm too (its start-up captures graphs and runs a prefill); the first run is recorded beside it.
    times = []
    with torch.no_grad():
        for _ in range(2):
            sync(dev)
            t0 = time.perf_counter()
            out = hf.generate(x, max_new_tokens=o.hf_new_tokens, min_new_tokens=o.hf_new_tokens, **kw)
            sync(dev)
            times.append(time.perf_counter() - t0)
    n = (out.shape[1] - o.prompt_len) * o.hf_batch
    del hf
    return {"tokens": n, "seconds": times[1], "tokens_per_s": n / times[1], "first_run_tokens_per_s": n / times[0],
            "batch": o.hf_batch, "new_tokens": o.hf_new_tokens}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shape, few tokens; runs on CPU")
    ap.add_argument("--device", default=None)
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--hf-batch", type=int, default=64)
    ap.add_argument("--hf-new-tokens", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--attention", default="auto", choices=["auto", "triton", "torch"])
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--random-lengths", action="store_true",
                    help="each request's max_tokens uniform in [new/8, new] (the bound assumes fixed lengths)")
    ap.add_argument("--arrival-waves", type=int, default=1,
                    help="submit the requests in this many waves, one every new_tokens / waves engine steps "
                         "(the bound assumes all at once)")
    ap.add_argument("--variants", default="", help=f"comma list of {list(VARIANTS)} or 'all': also run these")
    ap.add_argument("--kernels", default="", help="KEY=VALUE,... forge.engine.kernels settings for every run "
                    "(main run and variants), e.g. ATTN_STAGES=3,ATTN_WARPS=8")
    ap.add_argument("--profile", action="store_true", help="CUDA: where a decode step's time goes")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel degree of the engine: N processes, one GPU "
                    "each (gloo processes on CPU)")
    o = ap.parse_args()
    if o.tp > 1 and (o.variants or o.profile):
        ap.error("--tp > 1 measures the default engine only: drop --variants / --profile")
    kernel_settings = parse_kernel_settings(o.kernels)
    apply_kernel_settings(kernel_settings)
    if o.smoke:
        o.num_seqs, o.prompt_len, o.new_tokens, o.hf_batch, o.hf_new_tokens, o.block_size = 8, 16, 16, 4, 8, 16
    dev = torch.device(o.device or ("cuda" if torch.cuda.is_available() and not o.smoke else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    args = qwen25_05b(o.smoke)
    res: dict = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                 "dtype": str(dtype).removeprefix("torch."), "num_seqs": o.num_seqs, "prompt_len": o.prompt_len,
                 "new_tokens": o.new_tokens, "random_lengths": o.random_lengths, "arrival_waves": o.arrival_waves,
                 "torch": torch.__version__, "kernel_settings": kernel_settings, "tensor_parallel_size": o.tp}
    torch.manual_seed(0)

    res["hf"] = None
    if not o.skip_hf:
        try:
            res["hf"] = bench_hf(args, dev, dtype, o)
        except Exception:  # noqa: BLE001 - the bench reports what it could measure
            res["hf_error"] = traceback.format_exc(limit=3)
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    res["bandwidth_bytes_per_s"] = copy_bandwidth(dev, (1 << 30) if dev.type == "cuda" else (64 << 20))
    model = build_model(args, dev, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied: counted once
    res["forge"] = None
    for attempt in ([o.attention] if o.attention != "auto" else ["auto", "torch"]):
        try:
            o.attention = attempt
            res["forge"] = bench_forge(args, model, dev, dtype, o) if o.tp == 1 else bench_forge_tp(args, dev, dtype, o)
            break
        except Exception:  # noqa: BLE001
            res.setdefault("forge_errors", []).append(traceback.format_exc(limit=5))
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    kv_tok = 2 * args.num_hidden_layers * args.num_key_value_heads * args.head_dim * (torch.finfo(dtype).bits // 8)
    avg_ctx = o.prompt_len + o.new_tokens / 2
    step_bytes = weight_bytes + o.num_seqs * avg_ctx * kv_tok
    bound = res["bandwidth_bytes_per_s"] / step_bytes * o.num_seqs
    res["bound"] = {"tokens_per_s": bound, "weight_bytes": weight_bytes, "kv_bytes_per_step": o.num_seqs * avg_ctx * kv_tok}
    res["gemm_peak_flops"] = peak = gemm_peak_flops(dev, dtype)
    gemm_elems = sum(p.numel() for p in model.parameters() if p.dim() == 2)  # the tied embedding = lm_head
    bw = res["bandwidth_bytes_per_s"]
    step_s = max(weight_bytes / bw, 2 * o.num_seqs * gemm_elems / peak) + o.num_seqs * avg_ctx * kv_tok / bw
    res["roofline"] = {"tokens_per_s": o.num_seqs / step_s, "step_ms": 1e3 * step_s,
                       "weight_gemm_flops_per_step": 2 * o.num_seqs * gemm_elems}

    # "all": every variant, the defaults last (the main run above measured them first in a cold process)
    names = list(VARIANTS) if o.variants == "all" else [v for v in o.variants.split(",") if v]
    if names:
        res["variants"] = {}
        for name in names:
            try:
                res["variants"][name] = v = bench_forge(args, model, dev, dtype, o, **VARIANTS[name])
                v["forge_over_bound"] = v["tokens_per_s"] / bound
            except Exception:  # noqa: BLE001
                res["variants"][name] = {"error": traceback.format_exc(limit=5)}
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    if o.profile and dev.type == "cuda":
        try:
            res["profile"] = profile_forge(args, model, dev, dtype, o)
        except Exception:  # noqa: BLE001
            res["profile_error"] = traceback.format_exc(limit=8)

    f = res["forge"]["tokens_per_s"] if res["forge"] else float("nan")
    h = res["hf"]["tokens_per_s"] if res["hf"] else float("nan")
    res["forge_over_hf"] = f / h if res["hf"] else None
    res["forge_over_bound"] = f / bound
    roof = res["roofline"]["tokens_per_s"]
    res["forge_over_roofline"] = f / roof
    rows = [("forge LLMEngine", f, f"{o.num_seqs} seqs x {o.new_tokens} tok"),
            ("HF generate", h, f"{o.hf_batch} seqs x {o.hf_new_tokens} tok"),
            ("bandwidth bound", bound, f"{res['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s, {step_bytes / 1e9:.2f} GB/step"),
            ("roofline", roof, f"+ GEMM FLOPs at {peak / 1e12:.1f} TFLOP/s (measured), "
                               f"{res['roofline']['step_ms']:.3f} ms/step")]
    print(f"\ndevice {res['device']}  dtype {res['dtype']}  prompt {o.prompt_len}")
    print(f"{'':18}{'tokens/s':>12}  note")
    for name, v, note in rows:
        print(f"{name:18}{v:>12,.0f}  {note}")
    print(f"forge / HF    = {res['forge_over_hf'] or float('nan'):.1f}x")
    print(f"forge / bound = {100 * res['forge_over_bound']:.1f}%   (/ roofline = {100 * f / roof:.1f}%)")
    if res["forge"]:
        fr = res["forge"]
        print(f"(attention: {fr['attention']}, graphs: {len(fr['cuda_graphs'])}, steps: {fr['steps']}, "
              f"engine setup {fr['setup_s']:.1f}s; prefill {fr['prefill_s']:.3f}s, decode {fr['decode_s']:.3f}s, "
              f"median decode step {fr['decode_step_ms_median']:.2f} ms)")
    h_ok = res["hf"] is not None
    for name, v in res.get("variants", {}).items():
        if "error" in v:
            print(f"variant {name:22} ERROR {v['error'].splitlines()[-1][:100]}")
        else:
            print(f"variant {name:22}{v['tokens_per_s']:>10,.0f} tok/s  {100 * v['forge_over_bound']:5.1f}% of bound"
                  + (f"  {v['tokens_per_s'] / h:6.1f}x HF" if h_ok else "")
                  + f"  (prefill {v['prefill_s']:.3f}s, decode {v['decode_s']:.3f}s, median step "
                    f"{v['decode_step_ms_median']:.2f} ms, overlapped {v['overlapped_steps']})")
    prof = res.get("profile")
    if prof:
        print("profile:", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in prof.items()
                           if not isinstance(v, (list, dict))})
        for t, n, name in prof.get("kernels_ms_per_step", [])[:14]:
            print(f"  {t:8.3f} ms/step  x{n:<4} {name}")
        print("  attention (us, TN, warps, stages, GB/s):", [tuple(round(x, 1) if isinstance(x, float) else x for x in a)
                                                           for a in prof.get("attention_us_tn_warps_stages_GBps", [])[:5]])
        print("  attention by splits (splits, us, GB/s):", prof.get("attention_us_by_splits"),
              "default", prof.get("attention_splits_default"))
        lc = prof.get("attention_long_context")
        if lc:
            print(f"  attention, {lc['batch']} rows x {lc['context']} context (splits, us, GB/s):", lc["us_by_splits"],
                  "default", lc["default_splits"], "rel err", {k: f"{e:.1e}" for k, e in lc["rel_err_vs_1_split"].items()})
        print("  gemm (us, GB/s):", {k: (round(a, 1), round(b)) for k, (a, b) in prof.get("gemm_us_GBps", {}).items()})
        print("  sampler (us, (block, loads, warps)):", prof.get("sample_us_cfg"))
        for name, row in prof.get("gemm_layouts_us", {}).items():
            print(f"  gemm {name:8} us:", row)
    if "profile_error" in res:
        print(res["profile_error"], file=sys.stderr)
    for e in res.get("forge_errors", []) + ([res["hf_error"]] if "hf_error" in res else []):
        print(e, file=sys.stderr)
    if o.out:
        _record.write_json(o.out, res, indent=2)
    return 0 if res["forge"] else 1


if __name__ == "__main__":
    sys.exit(main())
