"""Per-token log-probabilities and entropy without materialising [N, V] float32 logits.

The trainer's hot path: `lm_head` is applied chunk by chunk, each chunk's logits go to float32,
and only per-token results ([N] log-prob, [N] entropy, [N] log-sum-exp) are kept. The backward
recomputes each chunk's logits instead of storing them, so peak memory is one chunk's
`[chunk_size, V]` float32 logits in forward and in backward — not the whole batch's.
"""

from __future__ import annotations

import torch

from forge.models.decoder import CausalLM


def _acc(dtype: torch.dtype) -> torch.dtype:
    # float32 accumulation for bf16/fp16/fp32; float64 stays float64 (lets gradcheck verify the backward)
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fwd_stats(z: torch.Tensor, tgt: torch.Tensor, temperature: float, acc: torch.dtype):
    """One chunk's logits (the matmul's dtype) -> log-sum-exp, target log-prob, entropy."""
    z = z.to(acc) / temperature
    lse = torch.logsumexp(z, dim=-1)
    lp = z.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) - lse
    ent = lse - (torch.softmax(z, dim=-1) * z).sum(-1)
    return lse, lp, ent


def _bwd_dz(z, tgt, lse, ent, g_lp, g_ent, temperature: float):
    """Gradient w.r.t. one chunk's raw logits: d lp/dz = onehot - p, d H/dz = -p (log p + H); / T."""
    logp = z.to(lse.dtype) / temperature - lse[:, None]
    p = logp.exp()
    dz = -p * (g_lp[:, None] + (logp + ent[:, None]) * g_ent[:, None])
    dz = dz.scatter_add(-1, tgt[:, None], g_lp[:, None])
    return (dz / temperature).to(z.dtype)


def _bwd_dz_fused(z, tgt, lse, ent, g_lp, g_ent, temperature: float):
    """`_bwd_dz` written as one element-wise expression (the target's one-hot through `where`, not
    `scatter_add`), so that torch.compile emits one kernel that writes dz once in z's dtype."""
    logp = z.to(lse.dtype) / temperature - lse[:, None]
    p = logp.exp()
    dz = -p * (g_lp[:, None] + (logp + ent[:, None]) * g_ent[:, None])
    cols = torch.arange(z.shape[-1], device=z.device)
    dz = torch.where(cols[None, :] == tgt[:, None], dz + g_lp[:, None], dz)
    return (dz / temperature).to(z.dtype)


_compiled: dict[str, object] = {}
COMPILE_BACKEND = "inductor"  # tests swap in "aot_eager" to trace the same path without a C++ toolchain
# On CUDA, the per-chunk element-wise work runs as two hand-written Triton kernels ("triton": one
# read of the logits for the statistics, one read + one write for the gradient) or through
# torch.compile ("compile").
CUDA_KERNELS = "triton"


def _kernels(use_compile: bool, device: torch.device | None = None):
    # On GPU the element-wise work over [chunk, V] (several passes over ~0.6 GB per chunk in eager)
    # fuses into one or two kernels.
    if not use_compile:
        return _fwd_stats, _bwd_dz
    if device is not None and device.type == "cuda" and CUDA_KERNELS == "triton":
        from forge.models import _lp_triton

        if _lp_triton.available():
            return _lp_triton.fwd_stats, _lp_triton.bwd_dz
    if not _compiled:
        _compiled["fwd"] = torch.compile(_fwd_stats, dynamic=True, backend=COMPILE_BACKEND)
        _compiled["bwd"] = torch.compile(_bwd_dz_fused, dynamic=True, backend=COMPILE_BACKEND)
    return _compiled["fwd"], _compiled["bwd"]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the lm_head matmuls run in: the autocast dtype for float32 inputs under autocast
    (what `hidden @ weight.t()` would give there), else the inputs' own dtype. The backward runs
    in the same dtype, so recompute gives exactly the forward's logits under autocast too."""
    dev = t.device.type
    if t.dtype == torch.float32 and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return t.dtype


def _mm_acc(acc: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """acc + a @ b in `out_dtype` (float32 for low-precision inputs): on CUDA cuBLAS accumulates into
    the float32 output directly (no [V, H] temporary, no extra cast/add passes)."""
    if a.dtype == out_dtype:
        return a @ b if acc is None else acc.addmm_(a, b)
    if a.is_cuda and out_dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(a, b, out_dtype=out_dtype) if acc is None else torch.addmm(acc, a, b, out_dtype=out_dtype)
    return (a @ b).to(out_dtype) if acc is None else acc.add_(a @ b)


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature: float, chunk_size: int, recompute: bool, use_compile: bool):
        fwd, _ = _kernels(use_compile, hidden.device)
        if hidden.shape[0] <= chunk_size:
            # one chunk: its logits are alive at the start of the backward either way (recomputed or
            # kept), and nothing runs between this forward and its backward, so keeping them costs no
            # peak memory and saves the recompute matmul
            recompute = False
        cdt = _compute_dtype(hidden)
        h_in_dtype, w_in_dtype = hidden.dtype, weight.dtype
        # cast once per call (not once per chunk as autocast would), and keep the cast copies
        hidden_c, weight_c = hidden.to(cdt), weight.to(cdt)
        n, acc = hidden.shape[0], _acc(cdt)
        lp = torch.empty(n, dtype=acc, device=hidden.device)
        ent, lse = torch.empty_like(lp), torch.empty_like(lp)
        kept: list[torch.Tensor] = []
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, n, chunk_size):
                e = min(s + chunk_size, n)
                z = hidden_c[s:e] @ weight_c.t()
                lse[s:e], lp[s:e], ent[s:e] = fwd(z, targets[s:e], temperature, acc)
                if not recompute:
                    kept.append(z)  # in the matmul's dtype (bf16 in training): exactly what recompute gives
        ctx.save_for_backward(hidden_c, weight_c, targets, lse, ent, *kept)
        ctx.temperature, ctx.chunk_size, ctx.use_compile = temperature, chunk_size, use_compile
        ctx.in_dtypes = (h_in_dtype, w_in_dtype)
        ctx.set_materialize_grads(False)
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, targets, lse, ent, *kept = ctx.saved_tensors
        h_dtype, w_dtype = ctx.in_dtypes
        _, bwd = _kernels(ctx.use_compile, hidden.device)
        t, cs, n = ctx.temperature, ctx.chunk_size, hidden.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if g_lp is None and g_ent is None:
            return (torch.zeros(hidden.shape, dtype=h_dtype, device=hidden.device) if need_h else None,
                    torch.zeros(weight.shape, dtype=w_dtype, device=weight.device) if need_w else None,
                    None, None, None, None, None)
        g_lp = torch.zeros_like(lse) if g_lp is None else g_lp.to(lse.dtype)
        g_ent = torch.zeros_like(lse) if g_ent is None else g_ent.to(lse.dtype)
        # weight grad: one chunk -> one matmul straight into the grad's dtype; several -> accumulated in
        # float32 (or float64) across chunks, cast once at the end
        w_acc = w_dtype if n <= cs else torch.promote_types(_acc(weight.dtype), w_dtype)
        g_h = None
        if need_h and n > cs:
            g_h = torch.empty(hidden.shape, dtype=h_dtype, device=hidden.device)
        g_w = None
        with torch.autocast(hidden.device.type, enabled=False):
            for i, s in enumerate(range(0, n, cs)):
                e = min(s + cs, n)
                h = hidden[s:e]
                z = kept[i] if kept else h @ weight.t()
                dz = bwd(z, targets[s:e], lse[s:e], ent[s:e], g_lp[s:e], g_ent[s:e], t)
                del z
                if need_h:
                    gh = dz @ weight
                    if n <= cs:
                        g_h = gh.to(h_dtype)
                    else:
                        g_h[s:e] = gh
                if need_w:
                    g_w = _mm_acc(g_w, dz.t(), h, w_acc)
        if need_h and g_h is None:  # no rows at all
            g_h = torch.zeros(hidden.shape, dtype=h_dtype, device=hidden.device)
        if need_w:
            g_w = torch.zeros(weight.shape, dtype=w_dtype, device=weight.device) if g_w is None else g_w.to(w_dtype)
        return g_h, g_w, None, None, None, None, None


def _vocab_sharded(weight: torch.Tensor) -> bool:
    """A DTensor split over the vocabulary on a 1-D mesh: a tensor-parallel `lm_head` inside the forward."""
    from torch.distributed.tensor import DTensor, Shard

    return isinstance(weight, DTensor) and weight.device_mesh.ndim == 1 and tuple(weight.placements) == (Shard(0),)


class _VocabParallelLogprobs(torch.autograd.Function):
    """`_ChunkedLogprobs` when each rank of `group` holds rows [off, off + V_local) of the `lm_head`
    weight (torch.chunk's split, as DTensor's Shard(0)). Per chunk: local logits, then three
    collectives on [chunk]-sized vectors (max, then sum-exp / sum p*z / target logit), never [N, V]:
    log-sum-exp, the target's log-prob and the entropy are those of the whole vocabulary. The
    backward recomputes the local logits; the hidden states' gradient (each rank's partial
    `dz @ w_local`) is summed over the group, the weight's stays local (its shard's gradient)."""

    @staticmethod
    def forward(ctx, hidden, w_local, targets, temperature: float, chunk_size: int, group, vocab: int):
        import torch.distributed as dist

        cdt = _compute_dtype(hidden)
        acc = _acc(cdt)
        per = -(-vocab // dist.get_world_size(group))
        off = dist.get_rank(group) * per
        local_t = targets - off
        in_range = (local_t >= 0) & (local_t < w_local.shape[0])
        local_t = torch.where(in_range, local_t, 0)
        h, w = hidden.to(cdt), w_local.to(cdt)
        n = hidden.shape[0]
        lp = torch.empty(n, dtype=acc, device=hidden.device)
        ent, lse = torch.empty_like(lp), torch.empty_like(lp)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, n, chunk_size):
                e = min(s + chunk_size, n)
                z = (h[s:e] @ w.t()).to(acc) / temperature
                m = z.max(-1).values if z.shape[-1] else z.new_full((e - s,), float("-inf"))
                dist.all_reduce(m, dist.ReduceOp.MAX, group=group)
                ex = torch.exp(z - m[:, None])
                tgt = torch.where(in_range[s:e], z.gather(-1, local_t[s:e, None]).squeeze(-1), 0.0)
                sums = torch.stack([ex.sum(-1), (ex * z).sum(-1), tgt])
                dist.all_reduce(sums, group=group)
                lse[s:e] = m + sums[0].log()
                lp[s:e] = sums[2] - lse[s:e]
                ent[s:e] = lse[s:e] - sums[1] / sums[0]
        ctx.save_for_backward(h, w, local_t, in_range, lse, ent)
        ctx.temperature, ctx.chunk_size, ctx.group = temperature, chunk_size, group
        ctx.in_dtypes = (hidden.dtype, w_local.dtype)
        ctx.set_materialize_grads(False)
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        import torch.distributed as dist

        h, w, local_t, in_range, lse, ent = ctx.saved_tensors
        h_dtype, w_dtype = ctx.in_dtypes
        t, cs, n = ctx.temperature, ctx.chunk_size, h.shape[0]
        g_lp = torch.zeros_like(lse) if g_lp is None else g_lp.to(lse.dtype)
        g_ent = torch.zeros_like(lse) if g_ent is None else g_ent.to(lse.dtype)
        g_h = torch.zeros(h.shape, dtype=lse.dtype, device=h.device)
        g_w = torch.zeros(w.shape, dtype=lse.dtype, device=w.device)
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, n, cs):
                e = min(s + cs, n)
                logp = (h[s:e] @ w.t()).to(lse.dtype) / t - lse[s:e, None]
                p = logp.exp()
                dz = -p * (g_lp[s:e, None] + (logp + ent[s:e, None]) * g_ent[s:e, None])
                dz = dz.scatter_add(-1, local_t[s:e, None], torch.where(in_range[s:e], g_lp[s:e], 0.0)[:, None])
                dz = (dz / t).to(h.dtype)
                g_h[s:e] = dz @ w
                g_w += (dz.t() @ h[s:e]).to(g_w.dtype)
        dist.all_reduce(g_h, group=ctx.group)  # every rank's vocabulary slice contributes to d/dh
        return g_h.to(h_dtype), g_w.to(w_dtype), None, None, None, None, None


def logprobs_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    recompute: bool = True,
    use_compile: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`log_softmax(hidden @ weight.T / temperature)[i, targets[i]]` and the entropy of each row.

    hidden [N, H] (any float dtype), weight [V, H] (the `lm_head` weight), targets [N] long.
    Returns (logprobs [N], entropy [N]) in float32 (float64 for float64 inputs); differentiable w.r.t.
    hidden and weight. `recompute=False` keeps each chunk's logits in the matmul dtype for backward
    (N*V*2 bytes in bf16) instead of recomputing them (one more lm_head matmul). `use_compile`
    (default: on CUDA) fuses the per-chunk element-wise work with torch.compile.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"logprobs_from_hidden: hidden {tuple(hidden.shape)} must be [N, H] and weight "
                         f"{tuple(weight.shape)} [V, H] with the same H")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"logprobs_from_hidden: targets {tuple(targets.shape)} must be [N={hidden.shape[0]}]")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if _vocab_sharded(weight):  # tensor parallel lm_head: vocab-parallel softmax, no full-vocab gather
        return _VocabParallelLogprobs.apply(hidden, weight.to_local(), targets.long(), float(temperature),
                                            int(chunk_size), weight.device_mesh.get_group(), weight.shape[0])
    if hasattr(weight, "full_tensor"):  # FSDP2 DTensor outside its module's forward
        weight = weight.full_tensor()
    if use_compile is None:
        use_compile = hidden.is_cuda
    return _ChunkedLogprobs.apply(hidden, weight, targets.long(), float(temperature), int(chunk_size),
                                  bool(recompute), bool(use_compile))


def compute_logprobs(
    model: CausalLM,
    tokens: torch.Tensor,
    *,
    response_len: int | None = None,
    response_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    positions: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
    chunk_size: int = 1024,
    return_entropy: bool = False,
    recompute: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each token given everything before it, for the tokens that are wanted.

    tokens [B, T]. Which tokens:
    - `response_len=R`: the last R tokens -> [B, R] (the trainer's prompt+response layout);
    - `response_mask` [B, T] bool: the marked tokens -> [B, T], 0 where unmarked (token 0 can't be marked);
    - neither: tokens 1..T-1 -> [B, T-1].
    Only the needed positions go through `lm_head`. With `return_entropy`, also the entropy of
    each predicting distribution, same shape.
    """
    b, t = tokens.shape
    hidden = model(tokens, positions=positions, document_ids=document_ids, return_hidden=True)
    w = model.lm_head.weight
    if response_mask is not None:
        if response_mask.shape != tokens.shape:
            raise ValueError(f"response_mask {tuple(response_mask.shape)} must match tokens {tuple(tokens.shape)}")
        mask = response_mask.bool()
        if mask[:, 0].any():
            raise ValueError("response_mask marks token 0, which has no prefix to predict it from")
        pred = mask[:, 1:]  # hidden at t predicts token t+1
        lp, ent = logprobs_from_hidden(hidden[:, :-1][pred], w, tokens[:, 1:][pred], temperature, chunk_size, recompute)
        out_lp = torch.zeros(b, t, dtype=torch.float32, device=tokens.device)
        out_ent = torch.zeros_like(out_lp)
        out_lp[:, 1:][pred] = lp  # index_put keeps autograd
        out_ent[:, 1:][pred] = ent
        return (out_lp, out_ent) if return_entropy else out_lp
    r = t - 1 if response_len is None else int(response_len)
    if not 0 < r < t:
        raise ValueError(f"response_len {response_len} must be in [1, {t - 1}] for tokens of length {t}")
    h = hidden[:, t - r - 1 : t - 1].reshape(b * r, -1)
    lp, ent = logprobs_from_hidden(h, w, tokens[:, t - r :].reshape(-1), temperature, chunk_size, recompute)
    lp, ent = lp.view(b, r), ent.view(b, r)
    return (lp, ent) if return_entropy else lp
