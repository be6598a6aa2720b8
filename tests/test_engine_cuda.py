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
    # every decode step queued before the previous step's tokens were read (the first: before the prefill's)
    assert eng.stats["overlapped_steps"] == max(lens) - 1 and eng.stats["decodes_joining_prefill"] == 1, eng.stats
    assert eng.blocks.num_free == eng.blocks.capacity_blocks


def qwen05_shape(layers: int, vocab: int, max_positions: int) -> CausalLM:
    """A float32 model of Qwen2.5-0.5B's widths (random weights) on the GPU."""
    args = ModelArgs(family="qwen2", vocab_size=vocab, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                     num_attention_heads=14, num_key_value_heads=2, attention_bias=True, rope_theta=1e6,
                     max_position_embeddings=max_positions, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(DEV):
        model = CausalLM(args)
    model.init_weights(std=0.02, seed=0)
    return model


def decode_logits(eng: LLMEngine, ids: list[list[int]]) -> torch.Tensor:
    """Logits of one decode step on each prompt's last token, after prefilling the rest."""
    for p in ids:
        eng.add_request(p[:-1], SamplingParams(temperature=0.0, max_tokens=2))
    while eng.scheduler.waiting:
        eng.step()
    seqs = list(eng.scheduler.running)
    for s, p in zip(seqs, ids):
        s.token_ids[-1] = p[-1]
    if eng.runner.fused is None:
        return eng.runner.decode(seqs).float()
    eng.runner.decode_launch(seqs, lambda: [eng._sampling_row(s) for s in seqs], eng.sampler).result()
    rows = min(b for b in eng.runner.graphs if b >= len(seqs))  # the graph the step replayed
    return eng.runner.graphs[rows][1][:len(seqs)].float()


def test_fused_bf16_as_close_to_float32_as_eager_bf16():
    """Qwen2.5-0.5B shape, 6 layers: the fused bf16 step and the eager bf16 step sit at the same
    distance from a float32 reference (both bf16-rounding far; neither is the reference)."""
    m32 = qwen05_shape(layers=6, vocab=151936, max_positions=4096)
    with torch.no_grad():  # norm weights away from 1: folding them into the projections must show
        for name, p in m32.named_parameters():
            if "layernorm" in name:
                p.copy_(torch.rand_like(p) + 0.5)
    args = m32.args
    m16 = copy.deepcopy(m32).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab_size, (4, 40), generator=g).tolist()
    outs = {}
    for name, model, fused, fold in [("ref", m32, False, False), ("eager", m16, False, False),
                                     ("fused", m16, True, False), ("folded", m16, True, True)]:
        eng = LLMEngine(model, EngineConfig(max_num_seqs=4, max_model_len=64, block_size=16, kv_cache_tokens=1024,
                                            fused_decode=fused, enable_cuda_graphs=fused, fold_norms=fold,
                                            dtype="float32" if name == "ref" else "bfloat16"), eos_token_ids=[])
        assert fused is False or eng.runner.fused.fold_norms == fold
        outs[name] = decode_logits(eng, ids)
    e_eager = rel(outs["eager"], outs["ref"])
    for name in ("fused", "folded"):
        e = rel(outs[name], outs["ref"])
        assert e < 3e-2 and e < 1.5 * e_eager + 1e-3, (name, e, e_eager)


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


def test_cublaslt_candidates_match_f_linear_inside_graphs():
    """Every cuBLASLt candidate the tuner may pick computes F.linear (bias epilogue included) on the
    decode shapes; a tuned GEMM replays inside a CUDA graph on new inputs; untuned shapes fall back."""
    import torch.nn.functional as F

    from forge.engine.cublaslt import GemmTuner, LtMatmul

    bf = torch.bfloat16
    tuner = GemmTuner(DEV, bf)
    torch.manual_seed(0)
    for kind, n, k, bias in [("qkv", 1152, 896, True), ("o", 896, 896, False), ("down", 896, 4864, False)]:
        ws = [((torch.randn(n, k, device=DEV) * k ** -0.5).to(bf), torch.randn(n, device=DEV).to(bf) if bias else None)
              for _ in range(4)]
        x = torch.randn(256, k, device=DEV).to(bf)
        choice = tuner.tune(kind, x, ws)
        assert 0 < choice.us <= choice.us_torch
        op = LtMatmul(tuner.lib, tuner.handle, 256, n, k, bias, bf, tuner.ws)
        cands = op.candidates()
        assert cands, kind
        for algo in cands:
            assert rel(op(x, ws[1][0], ws[1][1], algo), F.linear(x, ws[1][0], ws[1][1])) < 1e-2, (kind, algo.waves)
        op.close()
        xin = x.clone()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y = tuner.linear(kind, xin, ws[2][0], ws[2][1])
        xin.copy_(torch.randn_like(x))
        g.replay()
        assert rel(y, F.linear(xin, ws[2][0], ws[2][1])) < 1e-2
    x = torch.randn(8, 896, device=DEV).to(bf)  # never tuned: F.linear
    w = torch.randn(896, 896, device=DEV).to(bf)
    assert torch.equal(tuner.linear("o", x, w, None), F.linear(x, w, None))
    # accumulating into the output (the residual add of the folded-norm decode): beta = 1, in place
    for kind, n, k in [("o", 896, 896), ("down", 896, 4864)]:
        ws = [((torch.randn(n, k, device=DEV) * k ** -0.5).to(bf), None) for _ in range(4)]
        x = torch.randn(256, k, device=DEV).to(bf)
        choice = tuner.tune(kind, x, ws, accumulate=True)
        assert 0 < choice.us <= choice.us_torch
        op = LtMatmul(tuner.lib, tuner.handle, 256, n, k, False, bf, tuner.ws, accumulate=True)
        h0 = torch.randn(256, n, device=DEV).to(bf)
        ref = h0.float() + F.linear(x, ws[1][0]).float()
        for algo in op.candidates():
            h = h0.clone()
            op(x, ws[1][0], None, algo, out=h)
            assert rel(h, ref) < 1e-2, (kind, algo.waves)
        op.close()
        h = h0.clone()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            tuner.add_linear(kind, h, x, ws[2][0])
        h.copy_(h0)
        g.replay()
        assert rel(h, h0.float() + F.linear(x, ws[2][0]).float()) < 1e-2
    tuner.close()


def test_engine_with_tuned_gemms_matches_untuned():
    """The fused decode with cuBLASLt-tuned GEMMs (batch >= tune_gemms_min_rows) gives the same step
    as with F.linear up to summation order."""
    model = qwen05_shape(layers=2, vocab=4096, max_positions=512).to(torch.bfloat16)
    args = model.args
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab_size, (20, 12), generator=g).tolist()
    outs = {}
    for tune in (False, True):
        for fold in (False, True):
            eng = LLMEngine(model, EngineConfig(max_num_seqs=32, max_model_len=64, block_size=16, kv_cache_tokens=2048,
                                                tune_gemms=tune, cuda_graph_batch_sizes=[32], fold_norms=fold),
                            eos_token_ids=[])
            if tune:
                t = eng.runner.gemm_tuner
                assert t is not None and {k[0] for k in t.choices} == {"qkv", "o", "gate_up", "down", "lm_head"}
                assert any(k[-1] for k in t.choices) == fold  # o / down accumulate into the residual when folded
            else:
                assert eng.runner.gemm_tuner is None
            outs[tune, fold] = decode_logits(eng, ids)
    for fold in (False, True):
        assert rel(outs[True, fold], outs[False, fold]) < 1e-2
    assert rel(outs[False, True], outs[False, False]) < 3e-2
