"""Training-time attention: causal, or packed documents (no attention across documents).

CPU (and any device) path: SDPA with an explicit boolean mask for packed rows, `is_causal`
for plain rows. On CUDA, packed rows go through FlexAttention with a document block mask
(compiled once per shape family), which skips fully-masked blocks instead of computing them.
The block mask is built from per-block document-id ranges with a handful of small tensor ops
(no [B, T, T] mask is ever materialised, no host sync).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from forge.models.decoder import AttentionFn, LayerAgnosticAttention

# Grouped-query attention through SDPA on CUDA: "native" passes k/v with Hkv heads and
# `enable_gqa=True`; "expand" repeats them to Hq heads first (a view + one copy that torch.compile
# fuses into the RoPE kernel), which every SDPA backend accepts. CPU always uses "native".
SDPA_GQA = "native"
# Restrict SDPA on CUDA to one backend ("flash", "cudnn", "efficient", "math"); None = PyTorch's choice
# (cuDNN's flash kernels on H100 with torch 2.11).
SDPA_BACKEND: str | None = None
# FlexAttention kernel options (e.g. {"BLOCK_M": 128, "BLOCK_N": 64}); None = the library's defaults.
FLEX_KERNEL_OPTIONS: dict[str, Any] | None = None
FLEX_BLOCK = 128


def _expand_kv(x: torch.Tensor, hq: int) -> torch.Tensor:
    b, t, hkv, d = x.shape
    return x[:, :, :, None, :].expand(b, t, hkv, hq // hkv, d).reshape(b, t, hq, d)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    gqa = q.shape[2] != k.shape[2]
    if gqa and q.is_cuda and SDPA_GQA == "expand":
        k, v, gqa = _expand_kv(k, q.shape[2]), _expand_kv(v, q.shape[2]), False
    # [B, T, H, D] -> [B, H, T, D]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if SDPA_BACKEND is not None and q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([getattr(SDPBackend, _BACKENDS[SDPA_BACKEND])]):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                                 enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, enable_gqa=gqa)
    return out.transpose(1, 2)


_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}


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


@functools.lru_cache(maxsize=16)
def _block_causal(nb: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    ar = torch.arange(nb, device=device)
    return ar[:, None] >= ar[None, :], ar[:, None] > ar[None, :]


def document_block_mask(document_ids: torch.Tensor, mask_mod, block: int = FLEX_BLOCK):
    """FlexAttention `BlockMask` for causal attention within documents, from [B, T] ids (T % block == 0).

    A (q-block, kv-block) pair is *full* when both blocks lie in one and the same document and the kv
    block is strictly earlier; *partial* (computed with `mask_mod`) when it is causal and the
    blocks' document-id ranges overlap; skipped otherwise. For ids that never decrease along a row
    (packed documents) this is exactly `create_block_mask`'s answer; for any other ids it is a
    superset of the partial blocks, so still correct. ~15 small kernels, no host sync: the kv- and
    q-side index lists of both kinds come from one stacked sort.
    """
    from torch.nn.attention.flex_attention import BlockMask

    b, t = document_ids.shape
    nb = t // block
    d = document_ids.view(b, nb, block)
    lo, hi = d.amin(-1), d.amax(-1)  # [B, nb]
    qlo, qhi, klo, khi = lo[:, :, None], hi[:, :, None], lo[:, None, :], hi[:, None, :]
    causal, strictly = _block_causal(nb, document_ids.device)
    single = lo == hi
    full = strictly & (single[:, :, None] & single[:, None, :]) & (qlo == klo)
    partial = causal & (qlo <= khi) & (klo <= qhi) & ~full
    # [4, B, 1, nb, nb]: partial / full by q row (kv lists), and transposed (q lists, for the backward)
    m = torch.stack([partial, full, partial.transpose(1, 2), full.transpose(1, 2)]).unsqueeze(2)
    num = m.sum(-1, dtype=torch.int32)
    idx = torch.argsort(m.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    kw = dict(seq_lengths=(t, t), kv_num_blocks=num[0], kv_indices=idx[0], full_kv_num_blocks=num[1],
              full_kv_indices=idx[1], q_num_blocks=num[2], q_indices=idx[2], full_q_num_blocks=num[3],
              full_q_indices=idx[3], BLOCK_SIZE=(block, block), mask_mod=mask_mod)
    try:
        return BlockMask(**kw)
    except TypeError:  # a torch whose BlockMask takes other arguments: let it derive the q-side itself
        return BlockMask.from_kv_blocks(num[0], idx[0], num[1], idx[1], BLOCK_SIZE=block, mask_mod=mask_mod,
                                        seq_lengths=(t, t))


def _flex_attention_fn(document_ids: torch.Tensor) -> AttentionFn:
    docs = document_ids

    def mask_mod(bi, h, qi, ki):
        return (qi >= ki) & (docs[bi, qi] == docs[bi, ki])

    block_mask = document_block_mask(document_ids, mask_mod)
    flex = _compiled_flex()
    opts = FLEX_KERNEL_OPTIONS

    def attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = flex(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1], kernel_options=opts)
        return out.transpose(1, 2)

    return LayerAgnosticAttention(attn)


def make_training_attention(document_ids: torch.Tensor | None, seq_len: int, use_flex: bool | None = None) -> AttentionFn:
    if document_ids is None:
        return LayerAgnosticAttention(lambda q, k, v: _sdpa(q, k, v, None, causal=True))
    if use_flex is None:
        use_flex = document_ids.is_cuda and seq_len % FLEX_BLOCK == 0
    if use_flex:
        return _flex_attention_fn(document_ids)
    mask = document_causal_mask(document_ids)
    return LayerAgnosticAttention(lambda q, k, v: _sdpa(q, k, v, mask, causal=False))
