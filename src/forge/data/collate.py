"""Episodes -> the trainer batch of docs/CONTRACTS.md ("Trainer batch").

    inputs  = [{"tokens": [B, P+R], "prompt_mask": [B, P]}]
    targets = [{"response": [B, R], "ref_logprobs": [B, R] | None, "advantages": [B, 1],
                "padding_mask": [B, R], "generator_logprobs": [B, R] | None}]

Prompts are left-padded to the longest prompt of the batch and responses right-padded to the
longest response; `prompt_mask` marks real prompt tokens, so that the trainer never runs
attention over padding (torchforge runs left-padded prompts without a mask, which shifts
positions and makes the first importance ratios ~0.8 instead of 1). `padding_mask` is 1 on
response tokens that get gradient (multi-turn episodes zero out environment tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from forge.config.registry import register
from forge.types import Episode


def _pad_right(rows: Sequence[torch.Tensor], length: int, value: float, dtype: torch.dtype) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r[:length].to(dtype)
    return out


@register("collate", "episodes")
def collate_episodes(episodes: Sequence[Episode]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    if not episodes:
        raise ValueError("collate_episodes: got an empty list of episodes")
    for e in episodes:
        if e.completion is None:
            raise ValueError(f"episode {e.episode_id} has no completion")
        if e.advantage is None:
            raise ValueError(f"episode {e.episode_id} has no advantage (compute advantages before adding it)")
    pad_id = episodes[0].pad_id
    prompts = [e.completion.prompt_ids.long() for e in episodes]  # type: ignore[union-attr]
    responses = [e.completion.token_ids.long() for e in episodes]  # type: ignore[union-attr]
    p_len = max(len(p) for p in prompts)
    r_len = max(max(len(r) for r in responses), 1)

    tokens = torch.full((len(episodes), p_len + r_len), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros(len(episodes), p_len, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        tokens[i, p_len - len(p) : p_len] = p
        prompt_mask[i, p_len - len(p) :] = 1
        tokens[i, p_len : p_len + len(r)] = r
    response = tokens[:, p_len:].clone()

    mask = torch.zeros(len(episodes), r_len)
    for i, e in enumerate(episodes):
        m = e.response_mask
        mask[i, : min(len(m), r_len)] = m[:r_len]

    def stack_optional(get) -> torch.Tensor | None:
        vals = [get(e) for e in episodes]
        if any(v is None for v in vals):
            return None
        return _pad_right([torch.as_tensor(v, dtype=torch.float32).flatten() for v in vals], r_len, 0.0, torch.float32)

    advantages = torch.tensor([float(e.advantage) for e in episodes], dtype=torch.float32).unsqueeze(-1)  # type: ignore[arg-type]
    inputs = {"tokens": tokens, "prompt_mask": prompt_mask}
    targets = {
        "response": response,
        "ref_logprobs": stack_optional(lambda e: e.ref_logprobs),
        "advantages": advantages,
        "padding_mask": mask,
        "generator_logprobs": stack_optional(lambda e: e.completion.logprobs),
    }
    return [inputs], [targets]
