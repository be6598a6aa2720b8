"""Paged decode attention as one Triton kernel (CUDA; tests run it with TRITON_INTERPRET=1).

One program per (sequence, kv head): it loads the G query heads that share the kv head, walks
the sequence's blocks with an online softmax, and writes the G outputs. K/V are read exactly
once, straight from the paged cache: no gather copy, no padding to the longest sequence.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - CPU-only installs
    HAS_TRITON = False


if HAS_TRITON:

    @triton.jit
    def _paged_decode_kernel(Q, K, V, O, BT, LENS, scale, s_qb, s_qh, s_kn, s_kt, s_kh, s_ob, s_oh, s_bt,
                             G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        n = tl.load(LENS + b)
        g = tl.arange(0, GP)
        d = tl.arange(0, D)
        t = tl.arange(0, BS)
        gmask = g < G
        q = tl.load(Q + b * s_qb + (h * G + g)[:, None] * s_qh + d[None, :], mask=gmask[:, None], other=0.0)
        m = tl.full([GP], float("-inf"), tl.float32)
        l = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        for j in range(0, tl.cdiv(n, BS)):
            blk = tl.load(BT + b * s_bt + j).to(tl.int64)
            off = blk * s_kn + h * s_kh + t[:, None] * s_kt + d[None, :]
            k = tl.load(K + off)
            v = tl.load(V + off)
            s = tl.dot(q, tl.trans(k)) * scale  # [GP, BS], fp32 accumulate
            s = tl.where((j * BS + t)[None, :] < n, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        out = acc / l[:, None]
        tl.store(O + b * s_ob + (h * G + g)[:, None] * s_oh + d[None, :], out.to(O.dtype.element_ty),
                 mask=gmask[:, None])


def triton_supported(head_dim: int, block_size: int) -> bool:
    pow2 = lambda x: x >= 16 and x & (x - 1) == 0  # noqa: E731  (tl.dot tiles)
    return HAS_TRITON and pow2(head_dim) and pow2(block_size)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
    """q [B,1,Hq,D]; caches [NB, bs, Hkv, D]; tables [B, MB] int32; lens [B] int32 -> [B,1,Hq,D]."""
    b, _, hq, d = q.shape
    nb, bs, hkv, _ = k_cache.shape
    g = hq // hkv
    q2 = q.reshape(b, hq, d)
    out = torch.empty_like(q2)
    _paged_decode_kernel[(b, hkv)](
        q2, k_cache, v_cache, out, block_tables, context_lens, d ** -0.5,
        q2.stride(0), q2.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1), block_tables.stride(0),
        G=g, GP=max(16, triton.next_power_of_2(g)), D=d, BS=bs,
    )
    return out.view(b, 1, hq, d)
