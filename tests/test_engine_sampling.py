"""The sampler draws from exactly the documented distribution (chi-square), batched and seeded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

scipy_stats = pytest.importorskip("scipy.stats")

from forge.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from forge.engine.sampler import Sampler, SamplingBatch  # noqa: E402
from forge.models import build_tiny_model  # noqa: E402


def expected(logits: np.ndarray, t: float, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """Reference, written independently: masks from the full temperature-scaled p, renormalised."""
    z = logits / t
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.zeros_like(p, dtype=bool)
    mass = 0.0
    for rank, i in enumerate(order):
        ok = (top_k == 0 or rank < top_k) and (mass < top_p) and p[i] >= min_p * p.max()
        keep[i] = ok or rank == 0
        mass += p[i]
    q = np.where(keep, p, 0.0)
    return q / q.sum()


def chi2_ok(samples: np.ndarray, probs: np.ndarray) -> float:
    counts = np.bincount(samples, minlength=len(probs)).astype(float)
    assert counts[probs == 0].sum() == 0, "sampled a token the filters exclude"
    live = probs > 0
    exp = probs[live] * len(samples)
    # merge rare bins so every expected count is >= 5 (chi-square validity)
    order = np.argsort(exp)
    obs_s, exp_s = counts[live][order], exp[order]
    merged_o, merged_e, acc_o, acc_e = [], [], 0.0, 0.0
    for o, e in zip(obs_s, exp_s):
        acc_o, acc_e = acc_o + o, acc_e + e
        if acc_e >= 5:
            merged_o.append(acc_o), merged_e.append(acc_e)
            acc_o = acc_e = 0.0
    if acc_e and merged_e:
        merged_o[-1] += acc_o
        merged_e[-1] += acc_e
    if len(merged_e) < 2:
        return 1.0
    return scipy_stats.chisquare(merged_o, merged_e).pvalue


CASES = [
    dict(t=1.0, top_k=0, top_p=1.0, min_p=0.0),
    dict(t=0.6, top_k=0, top_p=1.0, min_p=0.0),
    dict(t=1.5, top_k=5, top_p=1.0, min_p=0.0),
    dict(t=1.0, top_k=0, top_p=0.7, min_p=0.0),
    dict(t=0.8, top_k=0, top_p=1.0, min_p=0.1),
    dict(t=1.2, top_k=8, top_p=0.9, min_p=0.02),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("seeded", [False, True])
def test_sampler_distribution_chi_square(case, seeded):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(24, generator=g) * 1.5
    n = 20000
    rows = [(case["t"], case["top_k"], case["top_p"], case["min_p"], (1000 + i) if seeded else None, 0, 3, False)
            for i in range(n)]
    sb = SamplingBatch.build(rows, torch.device("cpu"))
    tokens, logprobs = Sampler(torch.device("cpu"), seed=1)(logits.expand(n, -1), sb)
    probs = expected(logits.double().numpy(), **case)
    assert chi2_ok(tokens.numpy(), probs) > 1e-3
    wrong = expected(logits.double().numpy(), **{**case, "t": case["t"] * 1.3})  # the test has power
    assert chi2_ok(tokens.numpy(), wrong) < 1e-3 if (wrong > 0).sum() > 1 else True
    ref_lp = torch.log_softmax(logits.double() / case["t"], -1)[tokens]
    torch.testing.assert_close(logprobs.double(), ref_lp, atol=1e-5, rtol=1e-5)


def test_truncated_logprobs_option():
    logits = torch.randn(30, generator=torch.Generator().manual_seed(2))
    n = 64
    sb = SamplingBatch.build([(1.0, 5, 1.0, 0.0, None, 0, 0, True)] * n, torch.device("cpu"))
    tokens, lp = Sampler(torch.device("cpu"))(logits.expand(n, -1), sb)
    q = expected(logits.double().numpy(), 1.0, 5, 1.0, 0.0)
    with np.errstate(divide="ignore"):
        ref = torch.from_numpy(np.log(q))[tokens]
    torch.testing.assert_close(lp.double(), ref, atol=1e-5, rtol=1e-5)


def test_greedy_rows_mixed_with_sampled_rows():
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(3))
    rows = [(0.0 if i % 2 == 0 else 1.0, 0, 1.0, 0.0, None, 0, 0, False) for i in range(6)]
    tokens, lp = Sampler(torch.device("cpu"))(logits, SamplingBatch.build(rows, torch.device("cpu")))
    assert tokens[::2].tolist() == logits[::2].argmax(-1).tolist()
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1).gather(1, tokens[:, None]).squeeze(1))


@pytest.mark.parametrize("params", [dict(temperature=1.0), dict(temperature=0.7, top_k=6, top_p=0.8)])
def test_engine_first_token_distribution(params):
    """End to end: many requests on one prompt; the first sampled token follows the model's filtered p."""
    model = build_tiny_model("qwen2", seed=4, vocab_size=32, eos_token_id=None)
    prompt = [5, 9, 17, 3]
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[0, -1].double().numpy()
    eng = LLMEngine(model, EngineConfig(max_num_seqs=256, max_model_len=16, block_size=4), eos_token_ids=[])
    sp = SamplingParams(max_tokens=1, n=50, **params)
    outs = eng.generate([(prompt, sp)] * 80)  # 4000 draws, 50 per shared prefill
    first = np.array([s.token_ids[0] for o in outs for s in o.outputs])
    probs = expected(logits, params["temperature"], params.get("top_k", 0), params.get("top_p", 1.0), 0.0)
    assert chi2_ok(first, probs) > 1e-3
