"""The fused decode path (Triton kernels, device-resident decode state, overlap) on CPU.

Runs the kernels through Triton's interpreter (TRITON_INTERPRET=1) in a subprocess, in float32
(the interpreter's bf16 conversions truncate and its bf16 `tl.dot` is wrong, so bf16 is checked
on CUDA by tests/test_engine_cuda.py). Skipped where triton is not installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# triton 3.6's interpreter turns a loaded scalar into a 1-element array, which numpy >= 2.4 no longer
# converts with int(): loops with a loaded trip count fail there. Same result, read the one element.
INTERPRETER_SHIM = r"""
import triton.runtime.interpreter as _I
_orig_patch = _I._patch_lang_tensor
def _patch(tensor, scope):
    _orig_patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
_I._patch_lang_tensor = _patch
"""


def run_interpreted(code: str, timeout: int = 600) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    probe = subprocess.run([sys.executable, "-c", "import triton"], env=env, capture_output=True)
    if probe.returncode != 0:
        pytest.skip("triton not installed")
    r = subprocess.run([sys.executable, "-c", INTERPRETER_SHIM + code], env=env, capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


KERNELS = r"""
import torch
from forge.engine import kernels as K
from forge.engine.sampler import counter_uniform
from forge.engine.attention import decode_attention_torch
from forge.models.decoder import RMSNorm, apply_rope
torch.manual_seed(0)
x, r, w = torch.randn(5, 40), torch.randn(5, 40), torch.rand(40) + 0.5
n = RMSNorm(40, 1e-6)
n.weight.data.copy_(w)
h, y = K.add_rmsnorm(x, w, 1e-6, residual=r)
assert torch.equal(h, x + r)
torch.testing.assert_close(y, n(x + r))
emb, tok = torch.randn(30, 40), torch.tensor([3, 7, 29])
h, y = K.add_rmsnorm(emb, w, 1e-6, tokens=tok)
assert torch.equal(h, emb[tok])
torch.testing.assert_close(y, n(emb[tok]))
g, u = torch.randn(4, 3000), torch.randn(4, 3000)
torch.testing.assert_close(K.silu_mul(g, u), torch.nn.functional.silu(g) * u)
# a folded RMSNorm: g and u scaled by the row's rsqrt(mean(x^2) + eps) first
xn = torch.randn(4, 40) * 3
rs = torch.rsqrt(xn.pow(2).mean(-1, keepdim=True) + 1e-5)
torch.testing.assert_close(K.silu_mul(g, u, norm_x=xn, norm_eps=1e-5), torch.nn.functional.silu(g * rs) * (u * rs))

# sampling: the exact inverse-CDF token of the float64 distribution for the row's counter uniform
B, V = 64, 5000
logits = torch.randn(B, V) * 3
temp = torch.rand(B) + 0.3
temp[::5] = 0
seed, stream, ctr = torch.randint(0, 2**62, (B,)), torch.randint(0, 100, (B,)), torch.randint(0, 1000, (B,))
seed[7] = -1
uext = torch.rand(B, dtype=torch.float64)
tok, lp = K.sample(logits, temp, seed, stream, ctr, u=uext)
u = torch.where(seed >= 0, counter_uniform(seed, stream, ctr), uext)
te = torch.where(temp > 0, temp, 1.0)
z = logits.double() / te[:, None]
lse = torch.logsumexp(z, -1)
cdf = torch.exp(z - lse[:, None]).cumsum(-1)
ref = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1)).squeeze(1)
ref = torch.where(temp > 0, ref, logits.argmax(-1))
assert torch.equal(tok, ref), (tok != ref).sum()
torch.testing.assert_close(lp.double(), z.gather(1, tok[:, None]).squeeze(1) - lse, atol=1e-5, rtol=1e-5)
# many chunks per row (the chunk search, the greedy chunk), and a greedy row whose maximum occurs twice
lg, tz = logits.clone(), temp.clone()
tz[1] = 0
lg[1, 4000] = lg[1, 700] = lg[1].max() + 1
tok_c, lp_c = K.sample(lg, tz, seed, stream, ctr, u=uext, cfg=(256, 2, 4))
te_c = torch.where(tz > 0, tz, 1.0)
z_c = lg.double() / te_c[:, None]
cdf_c = torch.exp(z_c - torch.logsumexp(z_c, -1)[:, None]).cumsum(-1)
ref_c = torch.searchsorted(cdf_c, (u * cdf_c[:, -1]).unsqueeze(1)).squeeze(1)
ref_c = torch.where(tz > 0, ref_c, lg.argmax(-1))
assert int(tok_c[1]) == 700 and torch.equal(tok_c, ref_c), (tok_c != ref_c).sum()

# attention with RoPE / q-k norm / cache write, GQA and MHA, odd head_dim, any block size
for hq, hkv, d, bs, qkn in [(14, 2, 64, 16, False), (4, 4, 32, 32, True), (4, 2, 48, 8, True), (6, 2, 16, 12, False),
                             (3, 1, 16, 8, True)]:
    nb, b = 30, 4
    kc, vc = torch.randn(nb, bs, hkv, d), torch.randn(nb, bs, hkv, d)
    pos = torch.tensor([0, bs - 1, bs, 3 * bs - 2], dtype=torch.int32)
    bt = torch.randperm(nb - 1)[:12].add(1).view(4, 3).int()
    qkv = torch.randn(b, (hq + 2 * hkv) * d)
    q, k, v = qkv[:, : hq * d], qkv[:, hq * d : (hq + hkv) * d], qkv[:, (hq + hkv) * d :]
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    fr = torch.outer(torch.arange(128).float(), inv)
    cos, sin = torch.cat([fr, fr], -1).cos(), torch.cat([fr, fr], -1).sin()
    qn = kn = None
    if qkn:
        qn, kn = torch.rand(d) + 0.5, torch.rand(d) + 0.5
    kc2, vc2, kc3, vc3 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    kc0, vc0 = kc.clone(), vc.clone()
    out = K.attention(q, k, v, kc, vc, bt, pos, cos, sin, hq, q_norm=qn, k_norm=kn, eps=1e-6, splits=1)
    # the input RMSNorm folded into the projection: q/k/v scaled by the rows' norm scale (+ bias) in-kernel
    xn = torch.randn(b, 24) * 2
    rs = torch.rsqrt(xn.pow(2).mean(-1, keepdim=True) + 1e-5)
    bias = torch.randn(qkv.shape[1]) if hq != 4 else None
    raw = (qkv - (bias if bias is not None else 0.0)) / rs
    kcf, vcf = kc0.clone(), vc0.clone()
    nqd, nkd = hq * d, hkv * d
    outf = K.attention(raw[:, :nqd], raw[:, nqd:nqd + nkd], raw[:, nqd + nkd:], kcf, vcf, bt, pos, cos, sin, hq,
                       q_norm=qn, k_norm=kn, eps=1e-6, splits=2, workspace=K.AttentionWorkspace(b, hq, hkv, d,
                       torch.device("cpu"), splits=2), tokens=16, norm_x=xn, norm_eps=1e-5, qkv_bias=bias)
    torch.testing.assert_close(outf, out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(kcf, kc, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(vcf, vc, atol=1e-4, rtol=1e-4)
    # flash-decoding: the context split across programs (some splits empty at short contexts), one
    # workspace reused by every launch (its counters must come back to zero), combined in-kernel
    ws = K.AttentionWorkspace(b, hq, hkv, d, torch.device("cpu"), splits=5)
    for sp in (2, 3, 5):
        kcs, vcs = kc0.clone(), vc0.clone()
        outs = K.attention(q, k, v, kcs, vcs, bt, pos, cos, sin, hq, q_norm=qn, k_norm=kn, eps=1e-6,
                           splits=sp, workspace=ws, tokens=16)  # 16 per iteration: up to 3 per row to split
        torch.testing.assert_close(outs, out, atol=1e-5, rtol=1e-5)
        assert torch.equal(kcs, kc) and torch.equal(vcs, vc)
        assert int(ws.count.abs().sum()) == 0
    if bs & (bs - 1) == 0:  # two whole blocks per iteration
        out2 = K.attention(q, k, v, kc3, vc3, bt, pos, cos, sin, hq, q_norm=qn, k_norm=kn, eps=1e-6, tokens=2 * bs)
        torch.testing.assert_close(out2, out, atol=1e-5, rtol=1e-5)
    qq, kk = q.view(b, 1, hq, d), k.view(b, 1, hkv, d)
    if qkn:
        nq, nk = RMSNorm(d, 1e-6), RMSNorm(d, 1e-6)
        nq.weight.data.copy_(qn)
        nk.weight.data.copy_(kn)
        qq, kk = nq(qq), nk(kk)
    c_, s_ = cos[pos.long()].view(b, 1, 1, d), sin[pos.long()].view(b, 1, 1, d)
    qr, kr = apply_rope(qq, c_, s_), apply_rope(kk, c_, s_)
    slots = bt.long().gather(1, (pos.long() // bs)[:, None]).squeeze(1) * bs + pos.long() % bs
    kc2.view(-1, hkv, d)[slots] = kr.view(b, hkv, d)
    vc2.view(-1, hkv, d)[slots] = v.view(b, hkv, d)
    ref = decode_attention_torch(qr, kc2, vc2, bt, pos + 1).reshape(b, hq * d)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kc, kc2, atol=1e-6, rtol=1e-6)
    assert torch.equal(vc, vc2)
    # prefill rows: RoPE (+ q/k norm) of every head and the k/v cache write, one program per row
    n = 7
    pos_p = torch.randint(0, 128, (n,))
    slots_p = torch.randperm((nb - 1) * bs)[:n].add(bs)
    qkv = torch.randn(n, (hq + 2 * hkv) * d)
    q, k, v = qkv[:, : hq * d], qkv[:, hq * d : (hq + hkv) * d], qkv[:, (hq + hkv) * d :]
    kcp, vcp = kc0.clone(), vc0.clone()
    qo, ko = K.rope_store(q, k, v, kcp, vcp, slots_p, pos_p, cos, sin, hq, q_norm=qn, k_norm=kn, eps=1e-6)
    qq, kk = q.view(n, 1, hq, d), k.view(n, 1, hkv, d)
    if qkn:
        qq, kk = nq(qq), nk(kk)
    c_, s_ = cos[pos_p].view(n, 1, 1, d), sin[pos_p].view(n, 1, 1, d)
    qr, kr = apply_rope(qq, c_, s_).reshape(n, -1), apply_rope(kk, c_, s_).reshape(n, -1)
    torch.testing.assert_close(qo, qr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ko, kr, atol=1e-5, rtol=1e-5)
    kc2, vc2 = kc0.clone(), vc0.clone()
    kc2.view(-1, hkv, d)[slots_p] = kr.view(n, hkv, d)
    vc2.view(-1, hkv, d)[slots_p] = v.view(n, hkv, d)
    torch.testing.assert_close(kcp, kc2, atol=1e-6, rtol=1e-6)
    assert torch.equal(vcp, vc2)
print("ok")
"""


def test_fused_kernels_interpreted():
    run_interpreted(KERNELS)


ENGINE = r"""
import torch
from forge.engine import EngineConfig, LLMEngine, SamplingParams
from forge.models import build_tiny_model
from test_engine import hf_twin, hf_greedy, prompts, full_logprobs

def cfg(**kw):
    c = dict(max_num_seqs=8, max_model_len=128, block_size=16, fused_decode=True, fast_sampler=True)
    c.update(kw)
    return EngineConfig(**c)

for fam in ["qwen2", "llama", "qwen3"]:
    model = build_tiny_model(fam, seed=1)
    hf = hf_twin(model)
    ps = prompts([1, 5, 37, 20], seed=2)
    for overlap in (True, False):
        eng = LLMEngine(model, cfg(overlap_decode=overlap), eos_token_ids=[])
        assert eng.runner.fused is not None
        outs = eng.generate([(p, SamplingParams(temperature=0.0, max_tokens=6 + 2 * i)) for i, p in enumerate(ps)])
        for i, (p, o) in enumerate(zip(ps, outs)):
            assert o.outputs[0].token_ids == hf_greedy(hf, p, 6 + 2 * i), (fam, overlap, i)

# overlap really chains steps (same lengths: one batch throughout) and drops nothing
model = build_tiny_model("qwen2", seed=3)
hf = hf_twin(model)
ps = prompts([7, 9, 3], seed=5)
eng = LLMEngine(model, cfg(), eos_token_ids=[])
outs = eng.generate([(p, SamplingParams(temperature=0.0, max_tokens=20)) for p in ps])
assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf, p, 20) for p in ps]
assert eng.stats["steps"] == 1 + 19, eng.stats  # one prefill, 19 decode steps, no wasted step at the end
# every decode step was queued before the previous step's tokens were read, the first one before the
# prefill's first tokens were (they are its inputs, copied on the device)
assert eng.stats["overlapped_steps"] == 19 and eng.stats["decodes_joining_prefill"] == 1, eng.stats
assert eng.blocks.num_free == eng.blocks.capacity_blocks and not eng.has_unfinished()

# a stop token mid-stream under overlap: the row computed past the stop is dropped, blocks come back
free = outs[0].outputs[0].token_ids
stop = free[4]
out = eng.generate([(ps[0], SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[stop])),
                    (ps[1], SamplingParams(temperature=0.0, max_tokens=20))])
assert out[0].outputs[0].token_ids == free[: free.index(stop) + 1]
assert out[1].outputs[0].token_ids == outs[1].outputs[0].token_ids
eng.step()  # the last in-flight step (if any) is read and dropped
assert eng.blocks.num_free == eng.blocks.capacity_blocks

# rows stopping at different steps: the others go on without a drain (their state gathered on the
# device from the in-flight step's); tokens identical to the unfused engine, no step wasted
ps = prompts([6, 13, 3, 21], seed=8)
lens = [3, 9, 5, 12]
reqs = [(p, SamplingParams(temperature=0.8, max_tokens=n, seed=i)) for i, (p, n) in enumerate(zip(ps, lens))]
eng = LLMEngine(model, cfg(), eos_token_ids=[])
a = eng.generate(reqs)
b = LLMEngine(model, cfg(fused_decode=False, fast_sampler=False), eos_token_ids=[]).generate(reqs)
assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
assert [len(o.outputs[0].token_ids) for o in a] == lens
assert eng.stats["steps"] == 1 + 11 and eng.stats["overlapped_steps"] == 11, eng.stats
assert eng.blocks.num_free == eng.blocks.capacity_blocks and eng._pending is None

# requests arriving while a decode step is in flight: their prefill is queued before that step's tokens
# are read (no drain); every token as the unfused engine's, all blocks back
ps = prompts([5, 17, 9], seed=13)
reqs = [(p, SamplingParams(temperature=0.9, max_tokens=10, seed=20 + i)) for i, p in enumerate(ps)]
def staggered(eng):
    got, ids = {}, [eng.add_request(*reqs[0])]
    for k in range(100):
        if k == 4:
            ids += [eng.add_request(*r) for r in reqs[1:]]
        got.update((o.request_id, o) for o in eng.step())
        if k > 4 and not eng.has_unfinished():
            break
    return [got[i].outputs[0].token_ids for i in ids], eng
a, ea = staggered(LLMEngine(model, cfg(), eos_token_ids=[]))
b, eb = staggered(LLMEngine(model, cfg(fused_decode=False, fast_sampler=False), eos_token_ids=[]))
assert a == b and [len(t) for t in a] == [10, 10, 10]
assert ea.stats["prefills_ahead_of_decode"] == 1 and eb.stats["prefills_ahead_of_decode"] == 0, (ea.stats, eb.stats)
# the arrivals' decode joined the batch before their first tokens were read (no drain at all)
assert ea.stats["decodes_joining_prefill"] == 2, ea.stats
assert ea.blocks.num_free == ea.blocks.capacity_blocks and ea._pending is None

# sampled (seeded, derived-seed, n>1, greedy mixed in): fused == unfused token for token; logprobs exact
ps = prompts([4, 30, 11], seed=4)
reqs = [(ps[0], SamplingParams(temperature=0.0, max_tokens=8)),
        (ps[1], SamplingParams(temperature=0.7, max_tokens=8, seed=1, n=2)),
        (ps[2], SamplingParams(temperature=1.3, max_tokens=8))]
a = LLMEngine(model, cfg(), eos_token_ids=[]).generate(reqs)
b = LLMEngine(model, cfg(fused_decode=False, fast_sampler=False), eos_token_ids=[]).generate(reqs)
for (p, sp), x, y in zip(reqs, a, b):
    for sx, sy in zip(x.outputs, y.outputs):
        assert sx.token_ids == sy.token_ids, (sx.token_ids, sy.token_ids)
        ref = full_logprobs(model, p, sx.token_ids, sp.temperature or 1.0)
        torch.testing.assert_close(torch.tensor(sx.logprobs), ref, atol=1e-4, rtol=1e-4)
# top-p batch: the torch sampler on the fused step's logits, fed back to the device state
reqs = [(ps[1], SamplingParams(temperature=1.0, top_p=0.8, max_tokens=8, seed=5, n=2)),
        (ps[2], SamplingParams(temperature=0.5, max_tokens=8, seed=9))]
a = LLMEngine(model, cfg(), eos_token_ids=[]).generate(reqs)
b = LLMEngine(model, cfg(fused_decode=False, fast_sampler=False), eos_token_ids=[]).generate(reqs)
assert [s.token_ids for o in a for s in o.outputs] == [s.token_ids for o in b for s in o.outputs]

# back-pressure: preemption and recompute under the fused path
ps = prompts([70, 3, 25, 60, 9, 40], seed=11)
ref = LLMEngine(model, cfg(fused_decode=False, max_num_seqs=16, max_num_batched_tokens=512), eos_token_ids=[]).generate(
    [(p, SamplingParams(temperature=0.0, max_tokens=24)) for p in ps])
eng = LLMEngine(model, cfg(kv_cache_tokens=160, max_num_batched_tokens=32, max_num_seqs=4), eos_token_ids=[])
outs = eng.generate([(p, SamplingParams(temperature=0.0, max_tokens=24)) for p in ps])
assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref]
assert eng.scheduler.num_preemptions > 0
while eng._pending is not None:
    eng.step()
assert eng.blocks.num_free == eng.blocks.capacity_blocks
print("ok")
"""


def test_fused_engine_interpreted():
    run_interpreted(ENGINE, timeout=900)


FOLDED = r"""
import torch
from forge.actors.generator import load_weights_in_place
from forge.engine import EngineConfig, LLMEngine, SamplingParams
from forge.models import build_tiny_model
from test_engine import hf_twin, hf_greedy, prompts, full_logprobs

def cfg(**kw):
    c = dict(max_num_seqs=8, max_model_len=128, block_size=16, fused_decode=True, fast_sampler=True, fold_norms=True)
    c.update(kw)
    return EngineConfig(**c)

for fam in ["qwen2", "qwen3"]:  # q/k/v bias (added after the row scale); q/k norms after the folded norm
    model = build_tiny_model(fam, seed=1)
    with torch.no_grad():  # norm weights away from 1, so that folding them is visible
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.copy_(torch.rand_like(p) + 0.5)
    hf = hf_twin(model)
    ps = prompts([1, 5, 37, 20], seed=2)
    eng = LLMEngine(model, cfg(), eos_token_ids=[])
    assert eng.runner.fused is not None and eng.runner.fused.fold_norms
    outs = eng.generate([(p, SamplingParams(temperature=0.0, max_tokens=6 + 2 * i)) for i, p in enumerate(ps)])
    for i, (p, o) in enumerate(zip(ps, outs)):
        assert o.outputs[0].token_ids == hf_greedy(hf, p, 6 + 2 * i), (fam, i)
    # sampled: logprobs are the model's log-softmax at the drawn tokens
    out = eng.generate([(ps[2], SamplingParams(temperature=0.8, max_tokens=8, seed=3))])[0].outputs[0]
    ref = full_logprobs(model, ps[2], out.token_ids, 0.8)
    torch.testing.assert_close(torch.tensor(out.logprobs), ref, atol=1e-4, rtol=1e-4)
    # weights updated in place (as Generator.update_weights does): the folded copies follow
    new = build_tiny_model(fam, seed=7)
    with torch.no_grad():
        for name, p in new.named_parameters():
            if "layernorm" in name:
                p.copy_(torch.rand_like(p) + 0.5)
    load_weights_in_place(model, new.state_dict())
    hf_new = hf_twin(new)
    outs = eng.generate([(p, SamplingParams(temperature=0.0, max_tokens=8)) for p in ps[:2]])
    for p, o in zip(ps[:2], outs):
        assert o.outputs[0].token_ids == hf_greedy(hf_new, p, 8), fam
print("ok")
"""


def test_fused_engine_folded_norms_interpreted():
    """fold_norms=True: the norm weights folded into copies of the q/k/v and gate/up weights (6 launches
    per layer): greedy == HF, logprobs == the full forward's, and in-place weight updates re-fold."""
    run_interpreted(FOLDED, timeout=600)


TENSOR_PARALLEL = r"""
import multiprocessing as mp
import os
import socket

import torch
from forge.engine import EngineConfig, LLMEngine, SamplingParams
from forge.models import build_tiny_model
from test_engine import prompts

CFG = dict(max_num_seqs=8, max_model_len=128, block_size=16, fused_decode=True, fast_sampler=True,
           max_num_batched_tokens=64)
SEED = int(os.environ["TP_SEED"])

def reqs():
    ps = prompts([5, 37, 70, 13], seed=SEED)  # 70 tokens > the 64-token budget: a chunked prefill
    return [(ps[0], SamplingParams(temperature=0.0, max_tokens=6)),
            (ps[1], SamplingParams(temperature=0.9, max_tokens=8, seed=SEED, n=2)),  # forked blocks
            (ps[2], SamplingParams(temperature=0.0, max_tokens=5)),
            (ps[3], SamplingParams(temperature=1.1, top_k=20, max_tokens=3, seed=SEED + 1))]  # torch sampling

def res(outs):
    return [(s.token_ids, s.logprobs) for o in outs for s in o.outputs]

def worker(rank, port, q):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    eng = LLMEngine(build_tiny_model("qwen3", seed=SEED), EngineConfig(**CFG, tensor_parallel_size=2),
                    eos_token_ids=[])
    assert eng.runner.fused is not None and eng.runner.fused.num_kv == 1
    if rank:
        eng.follow()
    else:
        q.put((res(eng.generate(reqs())), dict(eng.stats)))
        eng.shutdown()
    torch.distributed.destroy_process_group()

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
ctx = mp.get_context("fork")
q = ctx.Queue()
procs = [ctx.Process(target=worker, args=(r, port, q)) for r in range(2)]
for p in procs:
    p.start()
got, stats = q.get(timeout=900)
for p in procs:
    p.join(60)
assert [p.exitcode for p in procs] == [0, 0]
# overlapped steps, a decode joining a prefill and batches that lost rows all ran at TP=2
assert stats["overlapped_steps"] > 0 and stats["decodes_joining_prefill"] > 0, stats
eng = LLMEngine(build_tiny_model("qwen3", seed=SEED), EngineConfig(**CFG), eos_token_ids=[])
want = res(eng.generate(reqs()))
assert [t for t, _ in got] == [t for t, _ in want], (got, want)
for (_, a), (_, b) in zip(got, want):
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)
print("ok")
"""


@pytest.mark.slow
def test_fused_engine_tensor_parallel_interpreted(monkeypatch):
    """The fused decode at TP=2 (two gloo processes, kernels interpreted): the same tokens and logprobs
    as one process, through overlap, decode joining a prefill, compaction, forks, torch and in-graph sampling."""
    import random

    monkeypatch.setenv("TP_SEED", str(random.randrange(10_000)))
    run_interpreted(TENSOR_PARALLEL, timeout=900)
