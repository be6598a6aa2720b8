"""Training throughput: forge's decoder vs HF transformers, same shape, same run.

Qwen2.5-0.5B shape (hidden 896, 24 layers, 14 heads / 2 KV, intermediate 4864, vocab 151936, tied),
random init, batch 8 x 1024 tokens, fwd + bwd + fused AdamW. forge computes the loss with the
chunked log-prob helper (no [N, V] float32 logits); HF runs its standard `labels=` loss.

    python bench/train_throughput.py --out bench_train.json                 # H100
    python bench/train_throughput.py --packed --precision bf16,amp          # packed docs, both precisions
    python bench/train_throughput.py --smoke                                # CPU, tiny shape, 2 steps

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

from forge.models import CausalLM, ModelArgs, enable_activation_checkpointing, logprobs_from_hidden, maybe_compile  # noqa: E402
from forge.models.attention import make_training_attention  # noqa: E402

VARIANTS = ["hf-eager-sdpa", "forge-eager-sdpa", "forge-compile-sdpa", "forge-compile-flex"]


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
        maybe_compile(model)
    return model


def loss_fn(variant: str, model, tokens, positions, docs, use_flex: bool, recompute: bool):
    if variant.startswith("hf"):
        # HF has no packed-document masking under sdpa: it always runs plain causal rows
        return model(input_ids=tokens, labels=tokens).loss
    attn = make_training_attention(docs if docs is not None else torch.zeros_like(tokens) if use_flex else None,
                                   tokens.shape[1], use_flex=use_flex)
    hidden = model(tokens, positions, docs, attention=attn, return_hidden=True)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    lp, _ = logprobs_from_hidden(h, model.lm_head.weight, tokens[:, 1:].reshape(-1), chunk_size=2048, recompute=recompute)
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
    times, loss = [], float("nan")
    for step in range(a.warmup + a.steps):
        sync()
        t0 = time.perf_counter()
        with autocast:
            l = loss_fn(variant, model, tokens, positions, docs, use_flex, not a.no_recompute)
        l.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if step >= a.warmup:
            times.append(time.perf_counter() - t0)
        loss = l.item()
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
    return Result(variant, precision, a.packed, tps, step_s * 1e3, tps * flops / peak,
                  tps * (flops + 6 * args.vocab_size * args.hidden_size) / peak, mem, loss)


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
    p.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM bf16 dense")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    variants = [v for v in a.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    if a.smoke:
        args = smoke_args()
        a.batch, a.seq, a.steps, a.warmup = 2, 64, 2, 1
        if device.type == "cpu":  # inductor/flex on CPU would spend minutes compiling
            variants = [v for v in variants if "compile" not in v]
    else:
        args = qwen25_05b()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    results = []
    for prec in a.precision.split(","):
        for v in variants:
            try:
                results.append(run_variant(v, prec, a, args, device))
            except Exception as e:  # one failing variant (e.g. OOM) must not hide the others
                results.append(Result(v, prec, a.packed, 0, 0, 0, 0, 0, float("nan"), f"{type(e).__name__}: {e}"[:300]))
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"\n{args.num_params() / 1e6:.0f}M params, {a.batch}x{a.seq} tokens, {dev_name}, packed={a.packed}, ac={a.ac}")
    print(f"{'variant':<22}{'prec':<6}{'tok/s':>10}{'step ms':>9}{'MFU':>7}{'MFU*':>7}{'mem GiB':>9}{'loss':>9}")
    for r in results:
        if r.error:
            print(f"{r.variant:<22}{r.precision:<6}  FAILED {r.error}")
        else:
            print(f"{r.variant:<22}{r.precision:<6}{r.tokens_per_s:>10.0f}{r.step_ms:>9.1f}{r.mfu:>7.1%}"
                  f"{r.mfu_incl_emb:>7.1%}{r.peak_mem_gib:>9.1f}{r.loss:>9.3f}")
    print("MFU* counts the embedding table as matmul FLOPs too (6*V*H per token)")
    if a.out:
        a.out.write_text(json.dumps({"device": dev_name, "model_args": asdict(args), "batch": a.batch, "seq": a.seq,
                                     "steps": a.steps, "peak_tflops": a.peak_tflops, "torch": torch.__version__,
                                     "results": [asdict(r) for r in results]}, indent=2))
        print(f"wrote {a.out}")
    return results


if __name__ == "__main__":
    main()
