import sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from generate_throughput import qwen25_05b
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache
import transformers
print("transformers", transformers.__version__, "torch", torch.__version__)
args = qwen25_05b(False)
dev, dt = torch.device("cuda"), torch.bfloat16
cfg = AutoConfig.for_model(**args.to_hf_config())
with torch.device(dev):
    hf = AutoModelForCausalLM.from_config(cfg, dtype=dt, attn_implementation="sdpa")
hf = hf.to(dev, dt).eval()
print("gen config:", hf.generation_config)
B, P, N = 64, 128, 128
x = torch.randint(0, args.vocab_size, (B, P), generator=torch.Generator().manual_seed(1)).to(dev)
kw = dict(attention_mask=torch.ones_like(x), do_sample=True, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=None, pad_token_id=0)
def timed(label, **extra):
    torch.cuda.synchronize(); t = time.perf_counter()
    out = hf.generate(x, max_new_tokens=N, min_new_tokens=N, **{**kw, **extra})
    torch.cuda.synchronize(); d = time.perf_counter() - t
    n = (out.shape[1] - P) * B
    print(f"{label:40} {n / d:9.0f} tok/s  ({1e3 * d / N:.2f} ms/step)", flush=True)
with torch.no_grad():
    hf.generate(x, max_new_tokens=4, min_new_tokens=4, **kw)
    timed("bench's call (first)")
    timed("bench's call (again)")
    timed("greedy", do_sample=False, temperature=None, top_k=None, top_p=None)
    timed("sampling, no min_new_tokens", min_new_tokens=None)
    # a hand-rolled loop on the same model: forward + multinomial, DynamicCache
    torch.cuda.synchronize(); t = time.perf_counter()
    cache = DynamicCache()
    out = hf(x, past_key_values=cache, use_cache=True)
    tok = torch.multinomial(torch.softmax(out.logits[:, -1].float(), -1), 1)
    for i in range(N - 1):
        out = hf(tok, past_key_values=cache, use_cache=True)
        tok = torch.multinomial(torch.softmax(out.logits[:, -1].float(), -1), 1)
    torch.cuda.synchronize(); d = time.perf_counter() - t
    print(f"{'hand loop (forward + multinomial)':40} {B * N / d:9.0f} tok/s  ({1e3 * d / N:.2f} ms/step)")
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        hf.generate(x, max_new_tokens=8, min_new_tokens=8, **kw)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))
