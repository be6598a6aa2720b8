"""The fused decode path on a GPU (skipped without CUDA + triton): bf16 kernels against torch,
the engine against HF, fused bf16 against eager bf16 and a float32 reference, sampling."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("triton")

from forge.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from forge.engine import kernels as K  # noqa: E402
from forge.engine.attention import decode_attention_torch  # noqa: E402
from forge.engine.sampler import counter_uniform  # noqa: E402
from forge.models import build_tiny_model  # noqa: E402
from forge.models.args import ModelArgs  # noqa: E402
from forge.models.decoder import CausalLM, RMSNorm, apply_rope  # noqa: E402

DEV = torch.device("cuda")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_kernels_bf16():
    torch.manual_seed(0)
    bf = torch.bfloat16
    x, r = torch.randn(300, 896, device=DEV).to(bf), torch.randn(300, 896, device=DEV).to(bf)
    w = (torch.rand(896, device=DEV) + 0.5).to(bf)
    n = RMSNorm(896, 1e-6).to(DEV, bf)
    n.weight.data.copy_(w)
    h, y = K.add_rmsnorm(x, w, 1e-6, residual=r)
    assert torch.equal(h, x + r)
    assert rel(y, n(x + r)) < 4e-3
    g, u = torch.randn(256, 4864, device=DEV).to(bf), torch.randn(256, 4864, device=DEV).to(bf)
    assert rel(K.silu_mul(g, u), torch.nn.functional.silu(g) * u) < 4e-3
    # attention: Qwen2.5-0.5B heads, ragged contexts
    hq, hkv, d, bs, b, nb = 14, 2, 64, 64, 64, 700
    kc, vc = torch.randn(nb, bs, hkv, d, device=DEV).to(bf), torch.randn(nb, bs, hkv, d, device=DEV).to(bf)
    pos = torch.randint(0, 640, (b,), device=DEV).int()
    pos[:3] = torch.tensor([0, 63, 64], device=DEV)
    bt = torch.randperm(nb - 1, device=DEV)[: b * 10].add(1).view(b, 10).int()
    qkv = torch.randn(b, (hq + 2 * hkv) * d, device=DEV).to(bf)
    q, k, v = qkv[:, : hq * d], qkv[:, hq * d : (hq + hkv) * d], qkv[:, (hq + hkv) * d :]
    inv = 1.0 / (1e6 ** (torch.arange(0, d, 2, device=DEV).float() / d))
    fr = torch.outer(torch.arange(1024, device=DEV).float(), inv)
    cos, sin = torch.cat([fr, fr], -1).cos(), torch.cat([fr, fr], -1).sin()
    kc2, vc2, kc0, vc0 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    out = K.attention(q, k, v, kc, vc, bt, pos, cos, sin, hq, splits=1)
    # flash-decoding splits (b=64 x 2 kv heads fills an H100/H200 with 2-3 splits), one workspace for all
    ws = K.AttentionWorkspace(b, hq, hkv, d, DEV, splits=8)
    for sp in (2, 3, 8, 8):
        kcs, vcs = kc0.clone(), vc0.clone()
        outs = K.attention(q, k, v, kcs, vcs, bt, pos, cos, sin, hq, splits=sp, workspace=ws)
        assert rel(outs, out) < 4e-3, sp
        assert torch.equal(kcs, kc) and torch.equal(vcs, vc) and int(ws.count.abs().sum()) == 0
    c_, s_ = cos[pos.long()].view(b, 1, 1, d), sin[pos.long()].view(b, 1, 1, d)
    qr, kr = apply_rope(q.view(b, 1, hq, d), c_, s_), apply_rope(k.view(b, 1, hkv, d), c_, s_)
    slots = bt.long().gather(1, (pos.long() // bs)[:, None]).squeeze(1) * bs + pos.long() % bs
    kc2.view(-1, hkv, d)[slots] = kr.view(b, hkv, d)
    vc2.view(-1, hkv, d)[slots] = v.view(b, hkv, d)
    ref = decode_attention_torch(qr.float(), kc2.float(), vc2.float(), bt, pos + 1).reshape(b, hq * d)
    assert rel(out, ref) < 1e-2
    assert (kc.float() - kc2.float()).abs().max() <= 2 ** -6 * kc2.float().abs().max() and torch.equal(vc, vc2)


def test_sample_kernel_matches_float64_inverse_cdf():
    torch.manual_seed(1)
    b, v = 256, 151936
    logits = (torch.randn(b, v, device=DEV) * 2).to(torch.bfloat16)
    temp = torch.rand(b, device=DEV) + 0.5
    temp[::7] = 0
    seed = torch.randint(0, 2**62, (b,), device=DEV)
    stream, ctr = torch.randint(0, 9, (b,), device=DEV), torch.randint(0, 999, (b,), device=DEV)
    tok, lp = K.sample(logits, temp, seed, stream, ctr)
    u = counter_uniform(seed, stream, ctr)
    z = logits.double() / torch.where(temp > 0, temp, 1.0).double()[:, None]
    lse = torch.logsumexp(z, -1)
    cdf = torch.exp(z - lse[:, None]).cumsum(-1)
    ref = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1)).squeeze(1)
    ref = torch.where(temp > 0, ref, logits.argmax(-1))
    assert (tok != ref).sum().item() <= 2  # float32 vs float64 cumulative mass: a boundary case at most
    torch.testing.assert_close(lp.double(), z.gather(1, tok[:, None]).squeeze(1) - lse, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3"])
def test_fused_engine_fp32_greedy_matches_transformers(family):
    from test_engine import hf_greedy, hf_twin, prompts

    model = build_tiny_model(family, seed=1)
    hf = hf_twin(model)
    ps = prompts([1, 5, 37, 90, 13], seed=2)
    eng = LLMEngine(model.to(DEV), EngineConfig(max_num_seqs=16, max_model_len=256, block_size=16, dtype="float32"),
                    eos_token_ids=[])
    assert eng.runner.fused is not None and eng.runner.graphs
    # rows stop at different steps: the batch shrinks across graph sizes (8 -> 4 -> 2 -> 1), gathered
    # on the device from the in-flight step each time, the padding rows reset
    lens = [20, 14, 9, 17, 4]
    outs = eng.generate([(p, SamplingParams(temperature=0.0, max_tokens=n)) for p, n in zip(ps, lens)])
    for p, o, n in zip(ps, outs, lens):
        assert o.outputs[0].token_ids == hf_greedy(hf, p, n)
    assert eng.stats["overlapped_steps"] == max(lens) - 2, eng.stats
    assert eng.blocks.num_free == eng.blocks.capacity_blocks


def test_fused_bf16_as_close_to_float32_as_eager_bf16():
    """Qwen2.5-0.5B shape, 6 layers: the fused bf16 step and the eager bf16 step sit at the same
    distance from a float32 reference (both bf16-rounding far; neither is the reference)."""
    args = ModelArgs(family="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=6,
                     num_attention_heads=14, num_key_value_heads=2, attention_bias=True, rope_theta=1e6,
                     max_position_embeddings=4096, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(DEV):
        m32 = CausalLM(args)
    m32.init_weights(std=0.02, seed=0)
    m16 = copy.deepcopy(m32).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab_size, (4, 40), generator=g).tolist()
    outs = {}
    for name, model, fused in [("ref", m32, False), ("eager", m16, False), ("fused", m16, True)]:
        eng = LLMEngine(model, EngineConfig(max_num_seqs=4, max_model_len=64, block_size=16, kv_cache_tokens=1024,
                                            fused_decode=fused, enable_cuda_graphs=fused, compile=False,
                                            dtype="float32" if name == "ref" else "bfloat16"), eos_token_ids=[])
        for p in ids:  # prefill 39 tokens, then one decode step on the 40th
            eng.add_request(p[:-1], SamplingParams(temperature=0.0, max_tokens=2))
        while eng.scheduler.waiting:
            eng.step()
        seqs = list(eng.scheduler.running)
        for s, p in zip(seqs, ids):
            s.token_ids[-1] = p[-1]
        if fused:
            eng.runner.decode_launch(seqs, lambda: [eng._sampling_row(s) for s in seqs], eng.sampler).result()
            outs[name] = eng.runner.graphs[4][1][:4].float()
        else:
            outs[name] = eng.runner.decode(seqs).float()
    e_eager, e_fused = rel(outs["eager"], outs["ref"]), rel(outs["fused"], outs["ref"])
    assert e_fused < 3e-2 and e_fused < 1.5 * e_eager + 1e-3, (e_fused, e_eager)


def test_fast_sampler_distribution_and_seeds_on_gpu():
    scipy_stats = pytest.importorskip("scipy.stats")
    model = build_tiny_model("qwen2", seed=4, vocab_size=32, eos_token_id=None)
    prompt = [5, 9, 17, 3]
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[0, -1].double()
    p = torch.softmax(logits / 0.8, -1).numpy()
    eng = LLMEngine(model.to(DEV), EngineConfig(max_num_seqs=256, max_model_len=16, block_size=4, dtype="float32"),
                    eos_token_ids=[])
    outs = eng.generate([(prompt, SamplingParams(max_tokens=1, n=64, temperature=0.8))] * 60)
    first = np.array([s.token_ids[0] for o in outs for s in o.outputs])
    counts = np.bincount(first, minlength=32)
    live = p * len(first) >= 5
    obs, exp = counts[live], p[live] * len(first)
    if (~live).any():
        obs, exp = np.append(obs, counts[~live].sum()), np.append(exp, p[~live].sum() * len(first))
    assert scipy_stats.chisquare(obs, exp).pvalue > 1e-3
    sp = SamplingParams(temperature=1.0, max_tokens=12, seed=77, n=3)
    a = eng.generate([(prompt, sp)])[0]
    b = eng.generate([([1, 2, 3], SamplingParams(max_tokens=5)), (prompt, sp)])[1]
    assert [s.token_ids for s in a.outputs] == [s.token_ids for s in b.outputs]
