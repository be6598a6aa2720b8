"""Attention over the paged KV cache (the decoder's `attention=fn` hook).

Cache layout per layer: `[num_blocks, block_size, Hkv, D]`; a sequence's block table lists its
blocks in order, so token `p` of a sequence lives at slot `table[p // bs] * bs + p % bs`.
The torch paths here run on any device (and inside CUDA graphs: shapes are static); on CUDA,
decode uses the Triton kernel of `forge.engine.triton_decode` when available.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttnMeta:
    """What the attention hook needs for one forward pass (device tensors)."""

    slot_mapping: torch.Tensor  # [B*T] int64: where each new token's k/v goes (0.. = scratch block for padding)
    block_tables: torch.Tensor  # [B, MB] int32
    context_lens: torch.Tensor  # [B] int32: tokens in the cache after this pass (decode)
    decode: bool
    starts: torch.Tensor | None = None  # [B] int64: position of each prefill row's first token
    has_prefix: bool = False  # some prefill row continues cached context (chunked / recomputed)


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slots: torch.Tensor) -> None:
    hkv, d = k.shape[-2], k.shape[-1]
    k_cache.view(-1, hkv, d).index_copy_(0, slots, k.reshape(-1, hkv, d))
    v_cache.view(-1, hkv, d).index_copy_(0, slots, v.reshape(-1, hkv, d))


def gather_kv(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """[NB, bs, Hkv, D] cache, [B, MB] tables -> [B, MB*bs, Hkv, D] (a copy)."""
    g = cache[block_tables]
    return g.flatten(1, 2)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, meta: AttnMeta) -> torch.Tensor:
    """q [B,T,Hq,D] (right-padded rows), fresh k/v already stored -> [B,T,Hq,D]."""
    gqa = q.shape[2] != k.shape[2]
    if not meta.has_prefix:
        # every row starts at position 0: causal attention over the fresh keys is exact
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, enable_gqa=gqa)
        return out.transpose(1, 2)
    kk = gather_kv(k_cache, meta.block_tables).transpose(1, 2)
    vv = gather_kv(v_cache, meta.block_tables).transpose(1, 2)
    t, s = q.shape[1], kk.shape[2]
    qpos = meta.starts.unsqueeze(1) + torch.arange(t, device=q.device).unsqueeze(0)  # [B, T]
    mask = torch.arange(s, device=q.device).view(1, 1, s) <= qpos.unsqueeze(2)  # [B, T, S]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), kk, vv, attn_mask=mask.unsqueeze(1), enable_gqa=gqa)
    return out.transpose(1, 2)


def decode_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
    """q [B,1,Hq,D] -> [B,1,Hq,D]. The q heads of one kv head become SDPA's query axis, so GQA
    needs no k/v expansion (HF's repeat_kv order: kv head j serves q heads j*G .. j*G+G-1)."""
    b, _, hq, d = q.shape
    hkv = k_cache.shape[2]
    kk = gather_kv(k_cache, block_tables).transpose(1, 2)  # [B, Hkv, S, D]
    vv = gather_kv(v_cache, block_tables).transpose(1, 2)
    s = kk.shape[2]
    mask = (torch.arange(s, device=q.device).unsqueeze(0) < context_lens.unsqueeze(1)).view(b, 1, 1, s)
    out = F.scaled_dot_product_attention(q.view(b, hkv, hq // hkv, d), kk, vv, attn_mask=mask)
    return out.reshape(b, 1, hq, d)
