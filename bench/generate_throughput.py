"""Generation throughput: forge's engine vs HF `generate` vs the memory-bandwidth bound.

    python bench/generate_throughput.py --out gen.json          # one GPU, Qwen2.5-0.5B shape, bf16
    python bench/generate_throughput.py --smoke                 # CPU, tiny shape, seconds

Random weights (throughput does not depend on their values), random prompts, sampling at
temperature 1 with EOS ignored, so every sequence generates exactly --new-tokens tokens.
forge: all --num-seqs requests submitted at once, wall time from submission to the last token
(prefill included). HF: `generate(do_sample=True)` on --hf-batch sequences (fewer new tokens
to keep it short; reported per second). Bound: every decode step must read all weights once
plus each sequence's KV cache (average context = prompt + new/2), at the measured device copy
bandwidth: bound tok/s = bandwidth / (weight bytes + batch * avg_ctx * kv bytes/token) * batch.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from forge.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from forge.models.args import ModelArgs  # noqa: E402
from forge.models.decoder import CausalLM  # noqa: E402


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


def build_model(args: ModelArgs, dev: torch.device, dtype: torch.dtype) -> CausalLM:
    with torch.device(dev):
        model = CausalLM(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
    return model.to(dtype).eval()


def bench_forge(args, model, dev, dtype, o) -> dict:
    max_len = o.prompt_len + o.new_tokens
    cfg = EngineConfig(max_num_seqs=o.num_seqs, max_model_len=max_len, block_size=o.block_size,
                       kv_cache_tokens=o.num_seqs * max_len, max_num_batched_tokens=max(4096, 4 * o.prompt_len),
                       dtype=dtype, device=dev, enable_cuda_graphs=not o.no_graphs, attention_backend=o.attention)
    t0 = time.perf_counter()
    eng = LLMEngine(model, cfg, eos_token_ids=[])
    setup_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    sp = SamplingParams(temperature=1.0, max_tokens=o.new_tokens, ignore_eos=True)
    warm = [(torch.randint(0, args.vocab_size, (o.prompt_len,), generator=g), sp.replace(max_tokens=8))
            for _ in range(min(8, o.num_seqs))]
    eng.generate(warm)
    reqs = [(torch.randint(0, args.vocab_size, (o.prompt_len,), generator=g), sp) for _ in range(o.num_seqs)]
    sync(dev)
    eng.stats.update(prefill_tokens=0, decode_tokens=0, steps=0)
    t0 = time.perf_counter()
    outs = eng.generate(reqs)
    sync(dev)
    dt = time.perf_counter() - t0
    n = sum(len(s.token_ids) for r in outs for s in r.outputs)
    assert n == o.num_seqs * o.new_tokens, f"expected {o.num_seqs * o.new_tokens} tokens, got {n}"
    res = {"tokens": n, "seconds": dt, "tokens_per_s": n / dt, "setup_s": setup_s, "steps": eng.stats["steps"],
           "attention": "triton" if eng.runner.use_triton else "torch", "cuda_graphs": sorted(eng.runner.graphs),
           "kv_bytes_per_token": eng.runner.kv_bytes_per_token(), "preemptions": eng.scheduler.num_preemptions}
    del eng
    return res


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
    with torch.no_grad():
        hf.generate(x, max_new_tokens=4, min_new_tokens=4, **kw)
        sync(dev)
        t0 = time.perf_counter()
        out = hf.generate(x, max_new_tokens=o.hf_new_tokens, min_new_tokens=o.hf_new_tokens, **kw)
        sync(dev)
    dt = time.perf_counter() - t0
    n = (out.shape[1] - o.prompt_len) * o.hf_batch
    del hf
    return {"tokens": n, "seconds": dt, "tokens_per_s": n / dt, "batch": o.hf_batch, "new_tokens": o.hf_new_tokens}


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
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    o = ap.parse_args()
    if o.smoke:
        o.num_seqs, o.prompt_len, o.new_tokens, o.hf_batch, o.hf_new_tokens, o.block_size = 8, 16, 16, 4, 8, 16
    dev = torch.device(o.device or ("cuda" if torch.cuda.is_available() and not o.smoke else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    args = qwen25_05b(o.smoke)
    res: dict = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                 "dtype": str(dtype).removeprefix("torch."), "num_seqs": o.num_seqs, "prompt_len": o.prompt_len,
                 "new_tokens": o.new_tokens, "torch": torch.__version__}
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
            res["forge"] = bench_forge(args, model, dev, dtype, o)
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

    f = res["forge"]["tokens_per_s"] if res["forge"] else float("nan")
    h = res["hf"]["tokens_per_s"] if res["hf"] else float("nan")
    res["forge_over_hf"] = f / h if res["hf"] else None
    res["forge_over_bound"] = f / bound
    rows = [("forge LLMEngine", f, f"{o.num_seqs} seqs x {o.new_tokens} tok"),
            ("HF generate", h, f"{o.hf_batch} seqs x {o.hf_new_tokens} tok"),
            ("bandwidth bound", bound, f"{res['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s, {step_bytes / 1e9:.2f} GB/step")]
    print(f"\ndevice {res['device']}  dtype {res['dtype']}  prompt {o.prompt_len}")
    print(f"{'':18}{'tokens/s':>12}  note")
    for name, v, note in rows:
        print(f"{name:18}{v:>12,.0f}  {note}")
    print(f"forge / HF    = {res['forge_over_hf'] or float('nan'):.1f}x")
    print(f"forge / bound = {100 * res['forge_over_bound']:.1f}%")
    if res["forge"]:
        print(f"(attention: {res['forge']['attention']}, graphs: {len(res['forge']['cuda_graphs'])}, "
              f"steps: {res['forge']['steps']}, engine setup {res['forge']['setup_s']:.1f}s)")
    for e in res.get("forge_errors", []) + ([res["hf_error"]] if "hf_error" in res else []):
        print(e, file=sys.stderr)
    if o.out:
        Path(o.out).write_text(json.dumps(res, indent=2))
    return 0 if res["forge"] else 1


if __name__ == "__main__":
    sys.exit(main())
