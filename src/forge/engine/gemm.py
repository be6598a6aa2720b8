"""Decode GEMMs through TMA descriptors (Hopper+; tests run them with TRITON_INTERPRET=1).

`linear(x, w, bias)` = x @ w.T (+ bias), x [M, K], w [N, K] (nn.Linear layout), both loaded tile
by tile through TMA descriptors (asynchronous bulk copies into shared memory, fed to the tensor
cores without passing through registers). Two epilogues that cuBLAS cannot take:

- `gated=True` (w = [gate; up], 2N rows): silu(x @ gate.T) * (x @ up.T), rounded where the eager
  `F.silu(g) * u` on bf16 tensors rounds, so the merged gate/up projection and the activation are
  one launch.
- `split_k > 1`: each output tile's K range is split across programs; every split writes its
  float32 partial to a workspace and bumps the tile's counter, the split that arrives last sums
  the partials in split order (deterministic whatever the arrival order), adds the bias and
  resets the counter, so one workspace serves every call and the path works inside CUDA graphs.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor

    HAS_TRITON = True
except Exception:  # pragma: no cover - CPU-only installs
    HAS_TRITON = False


if HAS_TRITON:

    @triton.jit
    def _tma_linear_kernel(A, W, BIAS, OUT, PART, CNT, M, N, K, s_o,
                           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
                           GATED: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr):
        """OUT[M, N] = A @ W[:N].T (+ bias); GATED: silu(that) * (A @ W[N:2N].T (+ bias))."""
        pid = tl.program_id(0)
        sk = tl.program_id(1)
        num_m = tl.cdiv(M, BM)
        pid_m = pid % num_m  # the M tiles of one N tile run together: W's tile is read from DRAM once
        pid_n = pid // num_m
        k_tiles = tl.cdiv(K, BK)
        per = tl.cdiv(k_tiles, SPLIT_K)
        k_lo = sk * per
        k_hi = tl.minimum(k_lo + per, k_tiles)
        acc = tl.zeros([BM, BN], tl.float32)
        acc_u = tl.zeros([BM, BN], tl.float32)
        for kt in range(k_lo, k_hi):
            a = A.load([pid_m * BM, kt * BK])
            w = W.load([pid_n * BN, kt * BK])
            if IEEE:
                acc = tl.dot(a, w.T, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w.T, acc)
            if GATED:
                wu = W.load([N + pid_n * BN, kt * BK])
                if IEEE:
                    acc_u = tl.dot(a, wu.T, acc_u, input_precision="ieee")
                else:
                    acc_u = tl.dot(a, wu.T, acc_u)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        omask = (rm < M)[:, None] & (rn < N)[None, :]
        o_ptr = OUT + rm.to(tl.int64)[:, None] * s_o + rn[None, :]
        if SPLIT_K > 1:
            tile = pid.to(tl.int64)
            r = tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]
            tl.store(PART + (tile * SPLIT_K + sk) * BM * BN + r, acc)
            # release: this split's partial is visible before the count; acquire: the last split sees all
            done = tl.atomic_add(CNT + tile, 1, sem="acq_rel")
            if done == SPLIT_K - 1:
                acc = tl.zeros([BM, BN], tl.float32)
                for s in range(SPLIT_K):  # split order: the same sum whichever split arrived last
                    acc += tl.load(PART + (tile * SPLIT_K + s) * BM * BN + r, cache_modifier=".cg")
                if HAS_BIAS:
                    acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
                tl.store(o_ptr, acc.to(OUT.dtype.element_ty), mask=omask)
                tl.atomic_xchg(CNT + tile, 0)
        else:
            if HAS_BIAS:
                acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
                if GATED:
                    acc_u += tl.load(BIAS + N + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
            if GATED:  # as F.silu(g) * u on tensors of OUT's dtype: g, u, silu(g) and the product rounded
                g = acc.to(OUT.dtype.element_ty).to(tl.float32)
                u = acc_u.to(OUT.dtype.element_ty).to(tl.float32)
                sg = (g / (1.0 + tl.exp(-g))).to(OUT.dtype.element_ty).to(tl.float32)
                acc = sg * u
            tl.store(o_ptr, acc.to(OUT.dtype.element_ty), mask=omask)


class LinearWorkspace:
    """Float32 partials and per-tile arrival counters of split-K launches, allocated once (before any
    CUDA graph capture) for output tiles of up to `elems` elements x splits in all."""

    def __init__(self, elems: int, tiles: int, device: torch.device):
        self.part = torch.empty(elems, dtype=torch.float32, device=device)
        self.count = torch.zeros(tiles, dtype=torch.int32, device=device)


_DESC: dict[tuple, object] = {}


def _descriptor(t: torch.Tensor, rows: int, cols: int):
    key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, rows, cols)
    d = _DESC.get(key)
    if d is None:
        if len(_DESC) >= 512:
            _DESC.pop(next(iter(_DESC)))
        d = _DESC[key] = TensorDescriptor.from_tensor(t, [rows, cols])
    return d


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
           gated: bool = False, split_k: int = 1, workspace: LinearWorkspace | None = None,
           block: tuple[int, int, int] = (128, 128, 64), num_warps: int = 4, num_stages: int = 4) -> torch.Tensor:
    """x [M, K] @ w[:N].T (+ bias) -> [M, N]; `gated`: w has 2N rows [gate; up] (bias too) and the result
    is silu(x @ gate.T + b_g) * (x @ up.T + b_u). x and w must have contiguous rows (16-byte aligned
    strides: TMA). `split_k > 1` needs a `workspace` (not with `gated`)."""
    m, k = x.shape
    n = w.shape[0] // 2 if gated else w.shape[0]
    bm, bn, bk = block
    if w.shape[1] != k:
        raise ValueError(f"linear: x has {k} columns, w {w.shape[1]}")
    if gated and split_k > 1:
        raise ValueError("linear: the gated epilogue needs the whole K range in one program (split_k=1)")
    o = out if out is not None else torch.empty(m, n, dtype=x.dtype, device=x.device)
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    if split_k > 1:
        if workspace is None:
            workspace = LinearWorkspace(tiles * split_k * bm * bn, tiles, x.device)
        if workspace.part.numel() < tiles * split_k * bm * bn or workspace.count.numel() < tiles:
            raise ValueError(f"linear: the workspace holds {workspace.part.numel()} partial elements for "
                             f"{workspace.count.numel()} tiles; asked for {tiles} tiles x {split_k} splits of {bm}x{bn}")
        part, cnt = workspace.part, workspace.count
    else:
        part, cnt = o, o
    _tma_linear_kernel[(tiles, split_k)](
        _descriptor(x, bm, bk), _descriptor(w, bn, bk), bias if bias is not None else o, o, part, cnt,
        m, n, k, o.stride(0), BM=bm, BN=bn, BK=bk, SPLIT_K=split_k, GATED=gated, HAS_BIAS=bias is not None,
        IEEE=x.dtype == torch.float32, num_warps=num_warps, num_stages=num_stages)
    return o
