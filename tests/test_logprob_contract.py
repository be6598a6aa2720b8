"""The logprob contract (forge.types.Completion, forge.engine.config.SamplingParams): returned
logprobs are log_softmax(logits / T) over the FULL vocabulary at the chosen tokens, not the
top-k/top-p-truncated, renormalised distribution (unless `truncated_logprobs=True`)."""

from __future__ import annotations

import torch

from forge.engine import EngineConfig, LLMEngine, SamplingParams
from forge.models import build_tiny_model


def _run(sp: SamplingParams, seed: int):
    model = build_tiny_model("qwen2", seed=seed, vocab_size=48, eos_token_id=None)
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 48, (5,), generator=g).tolist()
    eng = LLMEngine(model, EngineConfig(max_num_seqs=4, max_model_len=32, block_size=4), eos_token_ids=[])
    out = eng.generate([(prompt, sp)])[0].outputs[0]
    ids = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():  # the logits that predicted each generated token, recomputed in one forward
        logits = model(ids)[0, len(prompt) - 1: -1].double()
    return out, logits


def test_logprobs_are_full_vocabulary_at_temperature_with_top_k():
    t, k = 0.7, 3
    out, logits = _run(SamplingParams(temperature=t, top_k=k, max_tokens=8, seed=11), seed=21)
    tok = torch.tensor(out.token_ids)
    lp = torch.tensor(out.logprobs, dtype=torch.float64)
    full = torch.log_softmax(logits / t, -1).gather(1, tok[:, None]).squeeze(1)
    torch.testing.assert_close(lp, full, atol=2e-4, rtol=2e-4)
    # the truncated distribution gives strictly larger logprobs: the check above can tell them apart
    z = logits / t
    topk = z.topk(k, -1).values
    trunc = z.gather(1, tok[:, None]).squeeze(1) - torch.logsumexp(topk, -1)
    assert (trunc - full).min() > 1e-3


def test_truncated_logprobs_opt_in_is_the_renormalised_top_k():
    t, k = 0.7, 3
    out, logits = _run(SamplingParams(temperature=t, top_k=k, max_tokens=8, seed=12, truncated_logprobs=True), seed=22)
    tok = torch.tensor(out.token_ids)
    z = logits / t
    trunc = z.gather(1, tok[:, None]).squeeze(1) - torch.logsumexp(z.topk(k, -1).values, -1)
    torch.testing.assert_close(torch.tensor(out.logprobs, dtype=torch.float64), trunc, atol=2e-4, rtol=2e-4)


CONTRACT = ("Returned logprobs are log_softmax(logits / temperature)[token] over the FULL vocabulary: "
            "temperature-scaled, not truncated or renormalised by top-k/top-p/min-p (what a trainer recomputes "
            "from its own logits); greedy requests: log_softmax(logits)[token]. With `truncated_logprobs=True` "
            "they are under the truncated, renormalised distribution actually drawn from instead.")


def test_completion_and_sampling_params_state_the_one_contract_the_tests_above_check():
    from forge.types import Completion

    for doc in (Completion.__doc__, SamplingParams.__doc__):
        assert CONTRACT in " ".join(doc.split()), doc
