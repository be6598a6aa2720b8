"""Chunked log-probs/entropy against the full-vocabulary `log_softmax` reference: values and gradients."""

from __future__ import annotations

import pytest
import torch

from forge.models import build_tiny_model, compute_logprobs, logprobs_from_hidden


def _reference(h, w, targets, temperature):
    logp = ((h @ w.t()).float() / temperature).log_softmax(-1)
    return logp.gather(-1, targets[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("temperature,chunk", [(1.0, 7), (0.6, 16), (1.3, 1024)])
def test_values_and_gradients_match_full_log_softmax(temperature, chunk):
    g = torch.Generator().manual_seed(int(temperature * 10) + chunk)
    h = torch.randn(45, 24, generator=g, requires_grad=True)
    w = (torch.randn(300, 24, generator=g) * 0.5).requires_grad_()
    targets = torch.randint(0, 300, (45,), generator=g)
    lp, ent = logprobs_from_hidden(h, w, targets, temperature, chunk_size=chunk)
    rlp, rent = _reference(h, w, targets, temperature)
    assert lp.dtype == ent.dtype == torch.float32
    torch.testing.assert_close(lp, rlp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, rent, atol=1e-5, rtol=1e-5)
    a, b = torch.randn(45, generator=g), torch.randn(45, generator=g)
    got = torch.autograd.grad((lp * a + ent * b).sum(), (h, w))
    want = torch.autograd.grad((rlp * a + rent * b).sum(), (h, w))
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
    # only one of the two outputs used (the other's grad arrives as None)
    got = torch.autograd.grad((logprobs_from_hidden(h, w, targets, temperature, chunk)[0] * a).sum(), (h, w))
    want = torch.autograd.grad((_reference(h, w, targets, temperature)[0] * a).sum(), (h, w))
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(9, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, 11, (9,), generator=g)
    assert torch.autograd.gradcheck(lambda h, w: logprobs_from_hidden(h, w, t, 0.8, chunk_size=4), (h, w))


def test_bf16_inputs_float32_outputs_and_frozen_weight():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(20, 32, generator=g).bfloat16().requires_grad_()
    w = torch.randn(64, 32, generator=g).bfloat16()  # frozen (e.g. reference model): no weight grad
    t = torch.randint(0, 64, (20,), generator=g)
    lp, ent = logprobs_from_hidden(h, w, t, chunk_size=8)
    assert lp.dtype == torch.float32
    rlp, rent = _reference(h.float(), w.float(), t, 1.0)
    torch.testing.assert_close(lp, rlp, atol=2e-2, rtol=2e-2)
    lp.sum().backward()
    assert h.grad is not None and h.grad.dtype == torch.bfloat16


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"hidden \(4, 3\).*weight \(5, 2\)"):
        logprobs_from_hidden(torch.randn(4, 3), torch.randn(5, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets \(3,\)"):
        logprobs_from_hidden(torch.randn(4, 3), torch.randn(5, 3), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_compute_logprobs_matches_model_logits(family):
    model = build_tiny_model(family, seed=4)
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 512, (3, 20), generator=g)
    r, temp = 8, 0.7
    lp, ent = compute_logprobs(model, tokens, response_len=r, temperature=temp, chunk_size=5, return_entropy=True)
    logp = (model(tokens).float() / temp).log_softmax(-1)[:, :-1]
    ref = logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(lp, ref[:, -r:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, -(logp.exp() * logp).sum(-1)[:, -r:], atol=1e-5, rtol=1e-5)
    # gradients through the whole model equal those of the full-logits reference
    a = torch.randn(3, r, generator=g)
    got = torch.autograd.grad((lp * a).sum(), list(model.parameters()))
    want = torch.autograd.grad((ref[:, -r:] * a).sum(), list(model.parameters()))
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
    # all tokens, and an arbitrary response mask
    torch.testing.assert_close(compute_logprobs(model, tokens, temperature=temp), ref, atol=1e-5, rtol=1e-5)
    mask = torch.rand(3, 20, generator=g) > 0.5
    mask[:, 0] = False
    out = compute_logprobs(model, tokens, response_mask=mask, temperature=temp)
    torch.testing.assert_close(out[:, 1:][mask[:, 1:]], ref[mask[:, 1:]], atol=1e-5, rtol=1e-5)
    assert (out[~mask] == 0).all()


def test_compute_logprobs_packed():
    model = build_tiny_model("qwen3", seed=1).eval()
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(0, 512, (10,), generator=g), torch.randint(0, 512, (7,), generator=g)
    tokens = torch.cat([a, b])[None]
    positions = torch.cat([torch.arange(10), torch.arange(7)])[None]
    docs = torch.cat([torch.zeros(10), torch.ones(7)]).long()[None]
    with torch.no_grad():
        packed = compute_logprobs(model, tokens, positions=positions, document_ids=docs)
        lone_b = compute_logprobs(model, b[None])
    torch.testing.assert_close(packed[:, 10:], lone_b, atol=1e-5, rtol=1e-5)  # token 10 (b's first) skipped


@pytest.mark.parametrize("recompute,use_compile", [(False, False), (True, True)])
def test_saved_logits_and_compiled_kernels_match(monkeypatch, recompute, use_compile):
    import forge.models.logprobs as L

    monkeypatch.setattr(L, "COMPILE_BACKEND", "aot_eager")
    monkeypatch.setattr(L, "_compiled", {})
    g = torch.Generator().manual_seed(7)
    h = torch.randn(30, 16, generator=g).bfloat16().requires_grad_()
    w = torch.randn(100, 16, generator=g).bfloat16().requires_grad_()
    t = torch.randint(0, 100, (30,), generator=g)
    a, b = torch.randn(30, generator=g), torch.randn(30, generator=g)
    outs = []
    for kw in ({}, {"recompute": recompute, "use_compile": use_compile}):
        lp, ent = logprobs_from_hidden(h, w, t, 0.9, chunk_size=8, **kw)
        outs.append((lp, ent, *torch.autograd.grad((lp * a + ent * b).sum(), (h, w))))
    for x, y in zip(*outs):
        torch.testing.assert_close(x, y, atol=1e-2, rtol=1e-2)  # bf16 grads; fp32 stats agree ~exactly
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-5)
