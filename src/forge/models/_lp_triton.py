"""Triton kernels for the chunked log-prob helper (CUDA): the per-chunk element-wise work over
[rows, V] logits, each a single pass over the logits.

- `fwd_stats`: per row, an online (running-max) pass computes log-sum-exp, the target's
  log-prob and the entropy together: lse = m + log(sum e^(z-m)), H = lse - sum(e^(z-m) z) / sum(e^(z-m)).
- `bwd_dz`: dz = (-p (g_lp + (log p + H) g_ent) + onehot(target) g_lp) / T in z's dtype.

Same math as `logprobs._fwd_stats` / `logprobs._bwd_dz` (float32 throughout, logits scaled by
1/T); `logprobs` uses these on CUDA and the torch versions elsewhere.
"""

from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # no triton (CPU-only installs)
    triton = None


@functools.lru_cache(maxsize=1)
def available() -> bool:
    return triton is not None and torch.cuda.is_available()


FWD_BLOCK, BWD_BLOCK = 4096, 4096

if triton is not None:

    @triton.jit
    def _fwd_kernel(z_ptr, stride_z, tgt_ptr, lse_ptr, lp_ptr, ent_ptr, V, inv_t, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = z_ptr + row * stride_z
        cols = tl.arange(0, BLOCK)
        m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), 0)
        s = tl.zeros([BLOCK], dtype=tl.float32)
        t = tl.zeros([BLOCK], dtype=tl.float32)
        for off in tl.range(0, V, BLOCK):
            c = off + cols
            msk = c < V
            x = tl.load(base + c, mask=msk, other=float("-inf")).to(tl.float32) * inv_t
            m_new = tl.maximum(m, tl.max(x, 0))
            alpha = tl.exp(m - m_new)
            e = tl.exp(x - m_new)
            s = s * alpha + e
            t = t * alpha + tl.where(msk, e * x, 0.0)
            m = m_new
        ssum = tl.sum(s, 0)
        lse = m + tl.log(ssum)
        ent = lse - tl.sum(t, 0) / ssum
        tg = tl.load(tgt_ptr + row)
        zt = tl.load(base + tg).to(tl.float32) * inv_t
        tl.store(lse_ptr + row, lse)
        tl.store(lp_ptr + row, zt - lse)
        tl.store(ent_ptr + row, ent)

    @triton.jit
    def _bwd_kernel(z_ptr, stride_z, dz_ptr, stride_dz, tgt_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, V, inv_t,
                    BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        pid = tl.program_id(1)
        c = pid * BLOCK + tl.arange(0, BLOCK)
        msk = c < V
        x = tl.load(z_ptr + row * stride_z + c, mask=msk, other=0.0).to(tl.float32) * inv_t
        lse = tl.load(lse_ptr + row)
        h = tl.load(ent_ptr + row)
        glp = tl.load(glp_ptr + row)
        gent = tl.load(gent_ptr + row)
        tg = tl.load(tgt_ptr + row)
        logp = x - lse
        p = tl.exp(logp)
        dz = -p * (glp + (logp + h) * gent)
        dz = tl.where(c == tg, dz + glp, dz) * inv_t
        tl.store(dz_ptr + row * stride_dz + c, dz.to(dz_ptr.dtype.element_ty), mask=msk)


def fwd_stats(z: torch.Tensor, tgt: torch.Tensor, temperature: float, acc: torch.dtype):
    """z [n, V] (any float dtype, unit stride along V) -> (lse, target log-prob, entropy), each [n] float32."""
    assert acc == torch.float32 and z.stride(-1) == 1
    n, v = z.shape
    lse = torch.empty(n, dtype=torch.float32, device=z.device)
    lp, ent = torch.empty_like(lse), torch.empty_like(lse)
    if n:
        _fwd_kernel[(n,)](z, z.stride(0), tgt, lse, lp, ent, v, 1.0 / temperature, BLOCK=FWD_BLOCK, num_warps=8)
    return lse, lp, ent


def bwd_dz(z, tgt, lse, ent, g_lp, g_ent, temperature: float) -> torch.Tensor:
    """Gradient w.r.t. the chunk's raw logits, [n, V] in z's dtype."""
    assert z.stride(-1) == 1
    n, v = z.shape
    dz = torch.empty_like(z, memory_format=torch.contiguous_format)
    if n:
        grid = (n, triton.cdiv(v, BWD_BLOCK))
        _bwd_kernel[grid](z, z.stride(0), dz, dz.stride(0), tgt, lse.contiguous(), ent.contiguous(),
                          g_lp.contiguous(), g_ent.contiguous(), v, 1.0 / temperature, BLOCK=BWD_BLOCK, num_warps=8)
    return dz
