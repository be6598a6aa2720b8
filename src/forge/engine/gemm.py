"""Decode GEMMs with their neighbours fused in (CUDA; tests run them with TRITON_INTERPRET=1).

At a decode batch of a few hundred rows a layer's four GEMMs are short (K = hidden or
intermediate, M = the batch) and the norm, residual and activation kernels around them cost
as much as launching another GEMM. Two kernels take them in:

- `norm_linear(x, norm_w, eps, w)`: RMSNorm(x) @ w.T. Row scaling commutes with the product,
  so the prologue multiplies each loaded A tile by the norm weight and accumulates the row's
  sum of squares (the K loop reads the whole row anyway); the epilogue scales each output row
  by rsqrt(mean(x^2) + eps). `gated=True` (w = [gate; up] rows) keeps two accumulators and
  writes silu(gate) * up: the merged gate/up projection and the activation in one launch.
- `linear_residual(x, w, residual)`: residual + x @ w.T, written over the residual (the
  transformer's `h = h + o_proj(attn)` and `h = h + down(act)`). With `split_k > 1` each
  output tile's K range is split across programs; every split writes its float32 partial to
  a workspace and bumps the tile's counter, and the split that arrives last sums the partials
  in split order (deterministic, whatever the arrival order), applies the epilogue and resets
  the counter, so the path works inside CUDA graphs with one workspace for all layers.

Rounding differs from the eager layers only in fewer intermediate roundings (the normalised
activations and the gate/up outputs stay in float32): float32 results match the eager layers
to summation order; bf16 results are at least as close to a float32 reference
(tests/test_engine_cuda.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - CPU-only installs
    HAS_TRITON = False


if HAS_TRITON:

    @triton.jit
    def _dot(a, w, acc, IEEE: tl.constexpr):
        if IEEE:
            return tl.dot(a, tl.trans(w), acc, input_precision="ieee")
        return tl.dot(a, tl.trans(w), acc)

    @triton.jit
    def _norm_gemm_kernel(X, NW, W, BIAS, OUT, M, N, K, s_x, s_w, s_o, eps,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr,
                          ROW_SCALE: tl.constexpr,
                          GATED: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr):
        """OUT[M, N] = RMSNorm(X) @ W[:N].T (+ bias); GATED: silu(that) * (RMSNorm(X) @ W[N:2N].T + bias)."""
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BM)
        pid_m = pid % num_m  # the M tiles of one N tile run together: W's tile is read from DRAM once
        pid_n = pid // num_m
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        mm = rm < M
        nm = rn < N
        a_ptr = X + rm.to(tl.int64)[:, None] * s_x + rk[None, :]
        w_ptr = W + rn.to(tl.int64)[:, None] * s_w + rk[None, :]
        u_off = N.to(tl.int64) * s_w
        acc = tl.zeros([BM, BN], tl.float32)
        acc_u = tl.zeros([BM, BN], tl.float32)
        ss = tl.zeros([BM], tl.float32)
        for k0 in range(0, K, BK):
            if EVEN_K:
                a = tl.load(a_ptr, mask=mm[:, None], other=0.0)
                w = tl.load(w_ptr, mask=nm[:, None], other=0.0)
            else:
                km = (k0 + rk) < K
                a = tl.load(a_ptr, mask=mm[:, None] & km[None, :], other=0.0)
                w = tl.load(w_ptr, mask=nm[:, None] & km[None, :], other=0.0)
            if ROW_SCALE:
                af = a.to(tl.float32)
                ss += tl.sum(af * af, 1)
            if NORM:
                if EVEN_K:
                    g = tl.load(NW + k0 + rk)
                else:
                    g = tl.load(NW + k0 + rk, mask=(k0 + rk) < K, other=0.0)
                a = (af * g.to(tl.float32)[None, :]).to(w.dtype)
            acc = _dot(a, w, acc, IEEE)
            if GATED:
                if EVEN_K:
                    wu = tl.load(w_ptr + u_off, mask=nm[:, None], other=0.0)
                else:
                    wu = tl.load(w_ptr + u_off, mask=nm[:, None] & ((k0 + rk) < K)[None, :], other=0.0)
                acc_u = _dot(a, wu, acc_u, IEEE)
            a_ptr += BK
            w_ptr += BK
        if ROW_SCALE:
            r = 1.0 / tl.sqrt(ss / K + eps)
            acc = acc * r[:, None]
            acc_u = acc_u * r[:, None]
        if HAS_BIAS:
            acc += tl.load(BIAS + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
            if GATED:
                acc_u += tl.load(BIAS + N + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc = acc / (1.0 + tl.exp(-acc)) * acc_u
        o_ptr = OUT + rm.to(tl.int64)[:, None] * s_o + rn[None, :]
        tl.store(o_ptr, acc.to(OUT.dtype.element_ty), mask=mm[:, None] & nm[None, :])

    @triton.jit
    def _gemm_residual_kernel(X, W, BIAS, RES, OUT, WS, CNT, M, N, K, s_x, s_w, s_r, s_o, k_steps,
                              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr,
                              HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr):
        """OUT = RES + round(X @ W.T + bias) (OUT may be RES). Program (tile, split) covers
        `k_steps` BK-steps of K; SPLIT > 1: partials in WS, the last split to arrive combines."""
        tile = tl.program_id(0)
        sp = tl.program_id(1)
        num_m = tl.cdiv(M, BM)
        pid_m = tile % num_m
        pid_n = tile // num_m
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        mm = rm < M
        nm = rn < N
        k_lo = sp * k_steps * BK
        a_ptr = X + rm.to(tl.int64)[:, None] * s_x + k_lo + rk[None, :]
        w_ptr = W + rn.to(tl.int64)[:, None] * s_w + k_lo + rk[None, :]
        acc = tl.zeros([BM, BN], tl.float32)
        for k0 in range(k_lo, tl.minimum(K, k_lo + k_steps * BK), BK):
            if EVEN_K:
                a = tl.load(a_ptr, mask=mm[:, None], other=0.0)
                w = tl.load(w_ptr, mask=nm[:, None], other=0.0)
            else:
                km = (k0 + rk) < K
                a = tl.load(a_ptr, mask=mm[:, None] & km[None, :], other=0.0)
                w = tl.load(w_ptr, mask=nm[:, None] & km[None, :], other=0.0)
            acc = _dot(a, w, acc, IEEE)
            a_ptr += BK
            w_ptr += BK
        tm = mm[:, None] & nm[None, :]
        if SPLIT == 1:
            last = True
        else:
            i = tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]
            tl.store(WS + (tile * SPLIT + sp).to(tl.int64) * BM * BN + i, acc)
            # release: this split's partial is visible before the count; acquire: the last split
            # sees every other split's partial
            done = tl.atomic_add(CNT + tile, 1, sem="acq_rel")
            last = done == SPLIT - 1
            if last:
                acc = tl.zeros([BM, BN], tl.float32)
                for s in tl.static_range(SPLIT):  # split order: the sum does not depend on arrival order
                    acc += tl.load(WS + (tile * SPLIT + s).to(tl.int64) * BM * BN + i, cache_modifier=".cg")
                tl.atomic_xchg(CNT + tile, 0)
        if last:
            if HAS_BIAS:
                acc += tl.load(BIAS + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
            y = acc.to(OUT.dtype.element_ty).to(tl.float32)  # the projection's own rounding, as F.linear
            r = tl.load(RES + rm.to(tl.int64)[:, None] * s_r + rn[None, :], mask=tm, other=0.0)
            o = (r.to(tl.float32) + y).to(OUT.dtype.element_ty)
            tl.store(OUT + rm.to(tl.int64)[:, None] * s_o + rn[None, :], o, mask=tm)


@dataclass(frozen=True)
class GemmConfig:
    """Tile shape and launch of one fused GEMM (tuned per shape by bench/decode_gemm.py)."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 64
    warps: int = 4
    stages: int = 3
    split_k: int = 1


# H200, M = 256, Qwen2.5-0.5B shapes (bench/NOTES_generate.md); other shapes take the defaults
NORM_LINEAR_CONFIGS: dict[str, GemmConfig] = {}
LINEAR_RESIDUAL_CONFIGS: dict[str, GemmConfig] = {}


def _pick(table: dict[str, GemmConfig], m: int, n: int, k: int) -> GemmConfig:
    return table.get(f"{m}x{n}x{k}", table.get(f"*x{n}x{k}", GemmConfig()))


def norm_linear_config(m: int, n: int, k: int) -> GemmConfig:
    """The tuned config for an [m, k] x [n, k] `norm_linear` (n: all of w's rows, 2N when gated)."""
    return _pick(NORM_LINEAR_CONFIGS, m, n, k)


def linear_residual_config(m: int, n: int, k: int) -> GemmConfig:
    return _pick(LINEAR_RESIDUAL_CONFIGS, m, n, k)


class GemmWorkspace:
    """Split-K partials (float32) and per-tile arrival counters (int32, zero between launches),
    allocated once (before CUDA graph capture) and shared by every `linear_residual` call."""

    def __init__(self, floats: int, tiles: int, device: torch.device):
        self.partials = torch.empty(max(1, floats), dtype=torch.float32, device=device)
        self.count = torch.zeros(max(1, tiles), dtype=torch.int32, device=device)

    @staticmethod
    def size(m: int, n: int, cfg: GemmConfig) -> tuple[int, int]:
        tiles = -(-m // cfg.block_m) * -(-n // cfg.block_n)
        return tiles * cfg.split_k * cfg.block_m * cfg.block_n, tiles

    def fits(self, m: int, n: int, cfg: GemmConfig) -> bool:
        floats, tiles = self.size(m, n, cfg)
        return floats <= self.partials.numel() and tiles <= self.count.numel()


def _check(x: torch.Tensor, w: torch.Tensor, what: str) -> None:
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"{what}: x [M, K] and w [N, K] must share K, got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError(f"{what}: x and w need unit stride along K")


def norm_linear(x: torch.Tensor, norm_weight: torch.Tensor | None, eps: float, w: torch.Tensor,
                bias: torch.Tensor | None = None, gated: bool = False, out: torch.Tensor | None = None,
                cfg: GemmConfig | None = None, row_scale: bool | None = None) -> torch.Tensor:
    """RMSNorm(x) * norm_weight @ w.T (+ bias) -> [M, N]; no norm when `norm_weight` is None.
    `row_scale=True` with no norm_weight: the norm weight is already folded into w's columns.
    `gated`: w is [2N, K] = [gate; up] (bias [2N]) and the result is silu(gate) * up [M, N]."""
    _check(x, w, "norm_linear")
    m, k = x.shape
    n = w.shape[0] // 2 if gated else w.shape[0]
    if gated and w.shape[0] != 2 * n:
        raise ValueError(f"norm_linear(gated=True): w needs an even number of rows [gate; up], got {w.shape[0]}")
    cfg = cfg or norm_linear_config(m, w.shape[0], k)
    o = out if out is not None else torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    _norm_gemm_kernel[grid](
        x, norm_weight if norm_weight is not None else x, w, bias if bias is not None else w, o, m, n, k,
        x.stride(0), w.stride(0), o.stride(0), eps,
        BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, NORM=norm_weight is not None,
        ROW_SCALE=norm_weight is not None if row_scale is None else row_scale, GATED=gated,
        HAS_BIAS=bias is not None, EVEN_K=k % cfg.block_k == 0, IEEE=x.dtype == torch.float32,
        num_warps=cfg.warps, num_stages=cfg.stages)
    return o


def linear_residual(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor, bias: torch.Tensor | None = None,
                    out: torch.Tensor | None = None, cfg: GemmConfig | None = None,
                    workspace: GemmWorkspace | None = None) -> torch.Tensor:
    """residual + (x @ w.T + bias), the projection rounded to x's dtype first (as F.linear then
    an add). `out` may be `residual` itself (in place). A `workspace` is needed for split_k > 1
    (allocated here when not given: pass one when capturing a CUDA graph)."""
    _check(x, w, "linear_residual")
    m, k = x.shape
    n = w.shape[0]
    if residual.shape != (m, n):
        raise ValueError(f"linear_residual: residual must be [{m}, {n}], got {tuple(residual.shape)}")
    cfg = cfg or linear_residual_config(m, n, k)
    o = out if out is not None else torch.empty(m, n, dtype=x.dtype, device=x.device)
    k_steps_all = triton.cdiv(k, cfg.block_k)
    split = max(1, min(cfg.split_k, k_steps_all))
    per = triton.cdiv(k_steps_all, split)
    split = triton.cdiv(k_steps_all, per)  # no empty split
    cfg = GemmConfig(cfg.block_m, cfg.block_n, cfg.block_k, cfg.warps, cfg.stages, split)
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    if split > 1:
        if workspace is None:
            workspace = GemmWorkspace(*GemmWorkspace.size(m, n, cfg), device=x.device)
        if not workspace.fits(m, n, cfg):
            raise ValueError(f"linear_residual: the workspace holds {workspace.partials.numel()} partial floats and "
                             f"{workspace.count.numel()} tiles; [{m}, {n}] at {cfg} needs {GemmWorkspace.size(m, n, cfg)}")
        ws, cnt = workspace.partials, workspace.count
    else:
        ws = cnt = o
    _gemm_residual_kernel[(tiles, split)](
        x, w, bias if bias is not None else w, residual, o, ws, cnt, m, n, k,
        x.stride(0), w.stride(0), residual.stride(0), o.stride(0), per,
        BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, SPLIT=split, HAS_BIAS=bias is not None,
        EVEN_K=k % cfg.block_k == 0, IEEE=x.dtype == torch.float32, num_warps=cfg.warps, num_stages=cfg.stages)
    return o
