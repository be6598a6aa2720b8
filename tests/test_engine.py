"""LLMEngine on CPU (fp32, tiny models): exactness against HF transformers and a full forward."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from forge.engine import EngineConfig, LLMEngine, SamplingParams
from forge.models import CausalLM, build_tiny_model

V = 512


def hf_twin(model: CausalLM):
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**model.args.to_hf_config()),
                                          attn_implementation="eager", dtype=torch.float32)
    hf.load_state_dict(model.state_dict(), strict=True)
    return hf.eval()


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    x = torch.tensor([prompt])
    out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                      eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, V, (n,), generator=g).tolist() for n in lengths]


def engine(model, **kw) -> LLMEngine:
    cfg = dict(max_num_seqs=16, max_model_len=256, block_size=8, max_num_batched_tokens=512)
    cfg.update(kw)
    return LLMEngine(model, EngineConfig(**cfg), eos_token_ids=[])


def greedy(max_tokens=16, **kw):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def full_logprobs(model, prompt, gen, temperature=1.0):
    toks = torch.tensor([prompt + gen])
    with torch.no_grad():
        logits = model(toks)[0, len(prompt) - 1 : -1].float()
    lp = torch.log_softmax(logits / temperature, -1)
    return lp.gather(1, torch.tensor(gen).unsqueeze(1)).squeeze(1)


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3"])
def test_greedy_matches_transformers_batched(family):
    model = build_tiny_model(family, seed=1)
    hf = hf_twin(model)
    ps = prompts([1, 5, 37, 90, 13], seed=2)
    outs = engine(model).generate([(p, greedy(20)) for p in ps])
    for p, o in zip(ps, outs):
        assert o.outputs[0].token_ids == hf_greedy(hf, p, 20)
        assert o.outputs[0].stop_reason == "length"


def test_logprobs_match_full_forward():
    model = build_tiny_model("qwen2", seed=3)
    ps = prompts([4, 30, 11], seed=4)
    reqs = [(ps[0], greedy(12)), (ps[1], SamplingParams(temperature=0.7, max_tokens=12, seed=1)),
            (ps[2], SamplingParams(temperature=1.3, top_p=0.9, top_k=50, max_tokens=12, seed=2))]
    outs = engine(model).generate(reqs)
    for (p, sp), o in zip(reqs, outs):
        s = o.outputs[0]
        ref = full_logprobs(model, p, s.token_ids, sp.temperature or 1.0)
        torch.testing.assert_close(torch.tensor(s.logprobs), ref, atol=1e-4, rtol=1e-4)


def test_seed_reproducible_across_batch_composition():
    model = build_tiny_model("qwen2", seed=5)
    p, others = prompts([9], seed=6)[0], prompts([3, 50, 21], seed=7)
    sp = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=24, seed=1234, n=3)
    alone = engine(model).generate([(p, sp)])[0]
    mixed = engine(model, max_num_batched_tokens=40).generate(
        [(others[0], SamplingParams(max_tokens=30)), (p, sp)] + [(q, SamplingParams(max_tokens=7)) for q in others[1:]])[1]
    assert [s.token_ids for s in alone.outputs] == [s.token_ids for s in mixed.outputs]
    assert len({tuple(s.token_ids) for s in alone.outputs}) == 3  # the n samples differ
    other_seed = engine(model).generate([(p, sp.replace(seed=99))])[0]
    assert [s.token_ids for s in other_seed.outputs] != [s.token_ids for s in alone.outputs]


def test_unseeded_reproducible_for_same_engine_seed():
    model = build_tiny_model("qwen2", seed=5)
    reqs = [(p, SamplingParams(max_tokens=10, n=2)) for p in prompts([5, 12], seed=8)]
    a = [[s.token_ids for s in o.outputs] for o in engine(model, seed=3).generate(reqs)]
    b = [[s.token_ids for s in o.outputs] for o in engine(model, seed=3).generate(reqs)]
    assert a == b


def test_n_shared_prefill_equals_separate_requests():
    model = build_tiny_model("qwen2", seed=6)
    p = prompts([21], seed=9)[0]  # 21 tokens: a partial last block (block_size 8) gets copied per sample
    eng = engine(model)
    shared = eng.generate([(p, greedy(15, n=4))])[0]
    assert eng.stats["prefill_tokens"] == len(p)  # prefilled once
    separate = engine(model).generate([(p, greedy(15)) for _ in range(4)])
    assert [s.token_ids for s in shared.outputs] == [o.outputs[0].token_ids for o in separate]
    seeded = [engine(model).generate([(p, SamplingParams(max_tokens=15, seed=7, n=3))])[0] for _ in range(2)]
    assert [s.token_ids for s in seeded[0].outputs] == [s.token_ids for s in seeded[1].outputs]


def test_request_arriving_mid_decode():
    model = build_tiny_model("llama", seed=7)
    hf = hf_twin(model)
    a, b = prompts([6, 44], seed=10)
    eng = engine(model)
    ra = eng.add_request(a, greedy(30))
    done = {}
    for _ in range(8):  # a is decoding
        done.update({o.request_id: o for o in eng.step()})
    rb = eng.add_request(b, greedy(10))
    while eng.has_unfinished():
        done.update({o.request_id: o for o in eng.step()})
    assert done[ra].outputs[0].token_ids == hf_greedy(hf, a, 30)
    assert done[rb].outputs[0].token_ids == hf_greedy(hf, b, 10)


def test_chunked_prefill_and_back_pressure_all_complete():
    model = build_tiny_model("qwen2", seed=8)
    ps = prompts([70, 3, 25, 60, 9, 40, 17, 33], seed=11)
    ref = engine(model).generate([(p, greedy(24)) for p in ps])
    # 160 cache tokens for 8 requests needing up to 94 each: they wait, get preempted and recomputed
    eng = engine(model, kv_cache_tokens=160, max_num_batched_tokens=32, max_num_seqs=4, max_model_len=128)
    outs = eng.generate([(p, greedy(24)) for p in ps])
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref]
    assert eng.scheduler.num_preemptions > 0
    assert eng.blocks.num_free == eng.blocks.capacity_blocks  # every block came back


def test_overlapped_prefill_same_outputs():
    """Prefill steps queued before the previous one's first tokens are read (overlap_prefill) give
    the same tokens and logprobs: chunked prompts, n > 1 forks, one-token requests, seeded sampling."""
    model = build_tiny_model("qwen3", seed=12)
    ps = prompts([50, 7, 33, 64, 5, 21, 12, 40], seed=13)
    params = [SamplingParams(temperature=0.9, max_tokens=1 if i % 3 == 0 else 12, seed=i, n=2 if i % 2 else 1)
              for i in range(len(ps))]
    outs = {}
    for overlap in (False, True):
        eng = engine(model, max_num_batched_tokens=40, overlap_prefill=overlap)
        outs[overlap] = eng.generate(list(zip(ps, params)))
        assert (eng.stats["overlapped_steps"] > 0) == overlap
        assert eng.blocks.num_free == eng.blocks.capacity_blocks
    for a, b in zip(outs[False], outs[True]):
        assert [s.token_ids for s in a.outputs] == [s.token_ids for s in b.outputs]
        assert [s.logprobs for s in a.outputs] == [s.logprobs for s in b.outputs]
        assert [s.stop_reason for s in a.outputs] == [s.stop_reason for s in b.outputs]


def test_stop_tokens_max_model_len_and_long_prompts():
    model = build_tiny_model("qwen2", seed=9)
    p = prompts([10], seed=12)[0]
    free = engine(model).generate([(p, greedy(20))])[0].outputs[0].token_ids
    stop_tok = free[5]
    first = free.index(stop_tok)
    out = engine(model).generate([(p, greedy(20, stop_token_ids=[stop_tok]))])[0].outputs[0]
    assert out.token_ids == free[: first + 1] and out.stop_reason == "stop"
    eos = LLMEngine(model, EngineConfig(max_model_len=64, block_size=8), eos_token_ids=[stop_tok])
    assert eos.generate([(p, greedy(20))])[0].outputs[0].token_ids == free[: first + 1]
    ign = eos.generate([(p, greedy(20, ignore_eos=True))])[0].outputs[0]
    assert ign.token_ids == free and ign.stop_reason == "length"
    # prompt + max_tokens beyond max_model_len: capped, "length"
    capped = eos.generate([(prompts([60], seed=1)[0], greedy(20, ignore_eos=True))])[0].outputs[0]
    assert len(capped.token_ids) == 4 and capped.stop_reason == "length"
    long = prompts([80], seed=13)[0]
    rej = eos.generate([(long, greedy(5))])[0]
    assert rej.outputs[0].stop_reason == "prompt_too_long" and rej.outputs[0].token_ids == []
    trunc = LLMEngine(model, EngineConfig(max_model_len=64, block_size=8, long_prompt="truncate"), eos_token_ids=[])
    t = trunc.generate([(long, greedy(5))])[0]
    assert t.metadata["truncated_prompt_tokens"] == 80 - 59 and len(t.outputs[0].token_ids) == 5
    assert t.prompt_ids == list(long[-59:]) and t.metadata["prompt_truncated"] is True  # what it generated from
    assert t.outputs[0].token_ids == engine(model).generate([(long[-59:], greedy(5))])[0].outputs[0].token_ids


def test_bad_input_is_a_clear_error():
    model = build_tiny_model("qwen2", seed=9)
    eng = engine(model)
    with pytest.raises(ValueError, match="empty prompt"):
        eng.add_request([], greedy())
    with pytest.raises(ValueError, match=r"\[0, 512\)"):
        eng.add_request([1, 999], greedy())
    for not_ids in ([1, 2.5], torch.tensor([1.0, 2.0]), [True, 3]):  # not silently truncated to token ids
        with pytest.raises(ValueError, match="must be integers"):
            eng.add_request(not_ids, greedy())
    assert eng.add_request(torch.tensor([3, 4]), greedy()) >= 0 and eng.add_request(np.array([5, 6]), greedy()) >= 0
    with pytest.raises(ValueError, match="tokenizer"):
        eng.add_request([1, 2], SamplingParams(stop=["x"]))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(TypeError, match="unknown key"):
        EngineConfig.from_dict({"max_num_seq": 3})
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        engine(model, kv_cache_tokens=64, max_model_len=128)
    with pytest.raises(ValueError, match="exceeds max_num_seqs"):
        eng.add_request([1, 2], SamplingParams(n=17))
    with pytest.raises(ValueError, match="tune_gemms=True needs CUDA"):  # cuBLASLt tuning: CUDA graphs only
        engine(model, tune_gemms=True)
    with pytest.raises(ValueError, match="fold_norms=True needs the fused decode"):  # no fused path on CPU
        engine(model, fold_norms=True)
    assert engine(model).runner.fold_norms is False  # None: CUDA only


def test_folded_norm_copies_follow_in_place_updates():
    """fold_norms: the q/k/v and gate/up copies are W * g (one rounding), re-folded when a norm weight or a
    projection changes in place (and only then); a gate/up bias is refused (it comes after the row scale)."""
    from forge.engine.fused import FusedDecode, fold_bytes

    model = build_tiny_model("qwen2", seed=5)
    fd = FusedDecode(model, 64, fold_norms=True)
    layer, lw = model.model.layers[1], fd.layers[1]
    at = layer.self_attn
    w = torch.cat([at.q_proj.weight, at.k_proj.weight, at.v_proj.weight])
    assert torch.equal(lw.qkv_f, w * layer.input_layernorm.weight)
    assert fold_bytes(model) == sum(x.qkv_f.nbytes + x.gu_f.nbytes for x in fd.layers)
    assert not fd.refresh_folds()  # nothing changed
    g = torch.rand_like(layer.post_attention_layernorm.weight) + 0.5
    with torch.no_grad():
        layer.post_attention_layernorm.weight.copy_(g)
    assert fd.refresh_folds() and not fd.refresh_folds()
    mlp = layer.mlp
    assert torch.equal(lw.gu_f, torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]) * g)
    with pytest.raises(ValueError, match="gate/up projections have a bias"):
        FusedDecode(build_tiny_model("llama", seed=5, mlp_bias=True), 64, fold_norms=True)


def test_cublaslt_tuner_absent_without_cuda():
    from forge.engine import cublaslt

    if torch.cuda.is_available():
        pytest.skip("CPU behaviour")
    assert cublaslt.load() is None and not cublaslt.GemmTuner.supported(torch.device("cpu"), torch.bfloat16)


TRITON_CHECK = r"""
import triton.runtime.interpreter as _I  # triton 3.6 interpreter + numpy >= 2.4: see test_engine_fused.py
_orig_patch = _I._patch_lang_tensor
def _patch(tensor, scope):
    _orig_patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
_I._patch_lang_tensor = _patch
import torch
from forge.engine.attention import decode_attention_torch
from forge.engine.triton_decode import paged_decode_attention
torch.manual_seed(0)
for hq, hkv, d, bs in [(14, 2, 64, 16), (4, 4, 32, 32)]:
    kc, vc = torch.randn(30, bs, hkv, d), torch.randn(30, bs, hkv, d)
    lens = torch.tensor([1, bs, bs + 1, 3 * bs - 2], dtype=torch.int32)
    bt = torch.randperm(29)[:12].add(1).view(4, 3).int()
    q = torch.randn(4, 1, hq, d)
    err = (paged_decode_attention(q, kc, vc, bt, lens) - decode_attention_torch(q, kc, vc, bt, lens)).abs().max()
    assert err < 1e-5, err
print("ok")
"""


def test_triton_decode_kernel_interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1")
    probe = subprocess.run([sys.executable, "-c", "import triton"], env=env, capture_output=True)
    if probe.returncode != 0:
        pytest.skip("triton not installed")
    r = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


class _EagerGraph:
    """Stands in for a CUDA graph on CPU: replay re-runs the captured decode into the same output."""

    def __init__(self, runner, b, out):
        self.runner, self.b, self.out = runner, b, out

    def replay(self):
        self.out.copy_(self.runner.run_static(self.b))


def test_graph_decode_path_static_buffers():
    """The CUDA-graph decode plumbing (static inputs, padding to a captured size) on CPU."""
    model = build_tiny_model("qwen2", seed=10)
    hf = hf_twin(model)
    eng = engine(model, max_num_seqs=8)
    r = eng.runner
    r.alloc_static(8)
    with torch.inference_mode():
        for b in (8, 4, 2):  # 5, 3 live sequences pad up to 8 and 4
            r.graphs[b] = (_EagerGraph(r, b, r.run_static(b).clone()), r.run_static(b).clone())
    for g, out in r.graphs.values():
        g.out = out
    ps = prompts([3, 19, 7, 30, 11], seed=14)
    outs = eng.generate([(p, greedy(12 + 3 * i)) for i, p in enumerate(ps)])
    for i, (p, o) in enumerate(zip(ps, outs)):
        assert o.outputs[0].token_ids == hf_greedy(hf, p, 12 + 3 * i)
