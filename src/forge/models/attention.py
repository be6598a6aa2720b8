"""Training-time attention: causal, or packed documents (no attention across documents).

CPU (and any device) path: SDPA with an explicit boolean mask for packed rows, `is_causal`
for plain rows. On CUDA, packed rows go through FlexAttention with a document block mask
(compiled once per shape family), which skips fully-masked blocks instead of computing them.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from forge.models.decoder import AttentionFn


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    # [B, T, H, D] -> [B, H, T, D]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2)


def document_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] document ids -> [B, 1, T, T] boolean mask (True = may attend)."""
    t = document_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=document_ids.device).tril()
    same = document_ids.unsqueeze(2) == document_ids.unsqueeze(1)
    return (same & causal).unsqueeze(1)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex_attention_fn(document_ids: torch.Tensor) -> AttentionFn:
    from torch.nn.attention.flex_attention import create_block_mask

    b, t = document_ids.shape
    docs = document_ids

    def mask_mod(bi, h, qi, ki):
        return (qi >= ki) & (docs[bi, qi] == docs[bi, ki])

    block_mask = create_block_mask(mask_mod, b, None, t, t, device=document_ids.device)
    flex = _compiled_flex()

    def attn(layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = flex(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])
        return out.transpose(1, 2)

    return attn


def make_training_attention(document_ids: torch.Tensor | None, seq_len: int, use_flex: bool | None = None) -> AttentionFn:
    if document_ids is None:
        return lambda i, q, k, v: _sdpa(q, k, v, None, causal=True)
    if use_flex is None:
        use_flex = document_ids.is_cuda and seq_len % 128 == 0
    if use_flex:
        return _flex_attention_fn(document_ids)
    mask = document_causal_mask(document_ids)
    return lambda i, q, k, v: _sdpa(q, k, v, mask, causal=False)
