"""Random trainer batches in the format of docs/CONTRACTS.md ("Trainer batch"), for tests and benchmarks."""

from __future__ import annotations

import torch


def random_rl_batch(batch: int = 4, prompt_len: int = 8, response_len: int = 8, vocab: int = 512, pad_id: int = 0,
                    seed: int = 0, with_generator: bool = True, with_ref: bool = False, full: bool = False,
                    ) -> tuple[list[dict], list[dict]]:
    """Left-padded prompts, right-padded responses, random lengths (unless `full`)."""
    g = torch.Generator().manual_seed(seed)
    b, p, r = batch, prompt_len, response_len
    tokens = torch.randint(3, vocab, (b, p + r), generator=g)
    prompt_mask = torch.ones(b, p, dtype=torch.long)
    mask = torch.zeros(b, r)
    for i in range(b):
        k = 0 if full else int(torch.randint(0, p, (1,), generator=g))  # >= 1 real prompt token
        tokens[i, :k] = pad_id
        prompt_mask[i, :k] = 0
        n = r if full else int(torch.randint(1, r + 1, (1,), generator=g))
        mask[i, :n] = 1
        tokens[i, p + n:] = pad_id
    targets = {
        "response": tokens[:, p:].clone(),
        "padding_mask": mask,
        "advantages": torch.randn(b, 1, generator=g),
        "ref_logprobs": (-torch.rand(b, r, generator=g) * 4 - 1) * mask if with_ref else None,
        "generator_logprobs": (-torch.rand(b, r, generator=g) * 4 - 1) * mask if with_generator else None,
    }
    return [{"tokens": tokens, "prompt_mask": prompt_mask}], [targets]
