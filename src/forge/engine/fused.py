"""The decode forward as fused Triton kernels plus merged projections (see `forge.engine.kernels`).

`FusedDecode(model)` computes `CausalLM.forward` for one new token per row straight from the
model's own parameters. q/k/v (and gate/up) run as one GEMM each: at construction the three
(two) weight matrices are made views of one buffer (a no-op when they already are; otherwise
the parameters are re-pointed into a fresh buffer, no extra memory). In-place updates of the
parameters (`copy_`, `load_state_dict`, `Generator.update_weights`) therefore reach the merged
buffer. Re-pointing a parameter elsewhere (`p.data = t`) does not: `stale()` notices, and the
runner then rebuilds this object and re-captures its CUDA graphs.

`fold_norms=True` removes the two RMSNorm launches per layer (48 of a decode step's ~200 launches
at 24 layers). RMSNorm(h) W^T = rs(h) * (h (W diag(g))^T), rs(h) = rsqrt(mean(h^2) + eps): the
norm weight g is folded into a copy of the q/k/v (and gate/up) weight, the projection reads the
residual h itself, and the per-row scale rs (and the q/k/v bias, which comes after the scale) is
applied where the projection's output is read: in the attention kernel's prologue and in silu*mul,
which each recompute rs from h's row. The residual adds move into the o / down GEMMs (beta = 1,
in place on h). Costs: the folded copies (q/k/v + gate/up weights again; +47% of the weights at
Qwen2.5-0.5B's widths) and a re-fold (one multiply per weight) whenever those parameters or the
norm weights change in place; `refresh_folds()` notices through the parameters' version counters
(any `copy_` / `load_state_dict` / `Generator.update_weights`; not writes through `.data`).
Numerics: the folded weight is rounded once more (bf16(W g) instead of rounding the normalised
activations), and h + o is rounded once instead of twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from forge.engine import kernels as K


def merge_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One [sum(rows), ...] tensor whose row blocks ARE `tensors` (parameters re-pointed if needed)."""
    first = tensors[0]
    rows = sum(t.shape[0] for t in tensors)
    adjacent = all(t.is_contiguous() and t.dtype == first.dtype and t.device == first.device
                   and t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr() for t in tensors)
    ptr = first.data_ptr()
    for t in tensors:
        adjacent = adjacent and t.data_ptr() == ptr
        ptr += t.numel() * t.element_size()
    if adjacent:
        return first.data.as_strided((rows, *first.shape[1:]), first.stride())
    buf = torch.cat([t.data for t in tensors])
    off = 0
    for t in tensors:
        t.data = buf[off: off + t.shape[0]]
        off += t.shape[0]
    return buf


@dataclass
class _Layer:
    ln1: torch.Tensor
    ln1_eps: float
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor | None
    o_w: torch.Tensor
    o_b: torch.Tensor | None
    ln2: torch.Tensor
    ln2_eps: float
    gu_w: torch.Tensor
    gu_b: torch.Tensor | None
    down_w: torch.Tensor
    down_b: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    qk_eps: float
    qkv_f: torch.Tensor | None = None  # fold_norms: qkv_w * ln1 (per input column)
    gu_f: torch.Tensor | None = None  # fold_norms: gu_w * ln2


def fold_bytes(model) -> int:
    """Bytes of the folded weight copies `FusedDecode(model, fold_norms=True)` allocates."""
    n = 0
    for layer in model.model.layers:
        at, mlp = layer.self_attn, layer.mlp
        for m in (at.q_proj, at.k_proj, at.v_proj, mlp.gate_proj, mlp.up_proj):
            n += m.weight.numel() * m.weight.element_size()
    return n


class FusedDecode:
    def __init__(self, model, max_positions: int, fold_norms: bool = False, group=None):
        a = model.args
        # head counts and MLP width of this model's layers (a tensor-parallel shard holds its part of them)
        at0, mlp0 = model.model.layers[0].self_attn, model.model.layers[0].mlp
        self.num_heads, self.num_kv, self.head_dim = at0.n_heads, at0.n_kv, a.head_dim
        self.intermediate = mlp0.gate_proj.weight.shape[0]
        # tensor parallel (forge.engine.tp): o / down are row-parallel, their partial products summed over `group`
        self.group = group
        if group is not None and fold_norms:
            raise ValueError("fold_norms is not supported with tensor parallelism")
        self.layers: list[_Layer] = []
        for layer in model.model.layers:
            at, mlp = layer.self_attn, layer.mlp
            qkv = [at.q_proj, at.k_proj, at.v_proj]
            has_b = [m.bias is not None for m in qkv]
            if any(has_b) and not all(has_b):
                raise ValueError("fused decode: q/k/v projections must all have a bias or none")
            gu = [mlp.gate_proj, mlp.up_proj]
            self.layers.append(_Layer(
                ln1=layer.input_layernorm.weight, ln1_eps=layer.input_layernorm.eps,
                qkv_w=merge_rows([m.weight for m in qkv]),
                qkv_b=merge_rows([m.bias for m in qkv]) if all(has_b) else None,
                o_w=at.o_proj.weight, o_b=at.o_proj.bias,
                ln2=layer.post_attention_layernorm.weight, ln2_eps=layer.post_attention_layernorm.eps,
                gu_w=merge_rows([m.weight for m in gu]),
                gu_b=merge_rows([m.bias for m in gu]) if gu[0].bias is not None else None,
                down_w=mlp.down_proj.weight, down_b=mlp.down_proj.bias,
                q_norm=at.q_norm.weight if at.q_norm is not None else None,
                k_norm=at.k_norm.weight if at.k_norm is not None else None,
                qk_eps=at.q_norm.eps if at.q_norm is not None else 1e-6,
            ))
        self.embed = model.model.embed_tokens.weight
        self.norm, self.norm_eps = model.model.norm.weight, model.model.norm.eps
        self.lm_head_w, self.lm_head_b = model.lm_head.weight, model.lm_head.bias
        dev = self.embed.device
        self.cos, self.sin = model.model.rotary_emb.tables(max_positions, dev)
        self._model = model
        self._ptrs = self._param_ptrs(model)
        self.attn_workspace: K.AttentionWorkspace | None = None
        self.gemm_tuner = None  # forge.engine.cublaslt.GemmTuner: per-shape cuBLASLt algorithms (decode only)
        self.fold_norms = fold_norms
        self._fold_sources: list[torch.Tensor] = []
        self._fold_versions: list[int] | None = None
        if fold_norms:
            if any(lw.gu_b is not None for lw in self.layers):
                raise ValueError("fold_norms: the gate/up projections have a bias (its add would come after the "
                                 "norm's row scale); set fold_norms=False for this model")
            for layer, lw in zip(model.model.layers, self.layers):
                at, mlp = layer.self_attn, layer.mlp
                self._fold_sources += [layer.input_layernorm.weight, at.q_proj.weight, at.k_proj.weight,
                                       at.v_proj.weight, layer.post_attention_layernorm.weight,
                                       mlp.gate_proj.weight, mlp.up_proj.weight]
                lw.qkv_f, lw.gu_f = torch.empty_like(lw.qkv_w), torch.empty_like(lw.gu_w)
            self.refresh_folds()

    @torch.no_grad()
    def refresh_folds(self) -> bool:
        """Re-fold the norm weights into the q/k/v and gate/up copies if any of those parameters changed
        in place since the last fold (version counters); True when it re-folded. In place: the CUDA
        graphs captured over the copies stay valid."""
        if not self.fold_norms:
            return False
        versions = [t._version for t in self._fold_sources]
        if versions == self._fold_versions:
            return False
        for lw in self.layers:
            torch.mul(lw.qkv_w, lw.ln1, out=lw.qkv_f)  # one rounding of W * g
            torch.mul(lw.gu_w, lw.ln2, out=lw.gu_f)
        self._fold_versions = versions
        return True

    def tune_gemms(self, rows: int, tuner) -> None:
        """Pick the decode GEMMs' algorithms for a batch of `rows` (before capturing its graph), timed
        over every layer's weights on random activations; `forward` then runs them."""
        self.gemm_tuner = tuner
        dev, dt = self.embed.device, self.embed.dtype
        g = torch.Generator(device=dev).manual_seed(rows)
        act = lambda k: torch.randn(rows, k, device=dev, generator=g).to(dt)  # noqa: E731
        hidden, nq = self.embed.shape[1], self.num_heads * self.head_dim
        if self.fold_norms:  # the folded copies, no bias; o / down accumulate into the residual
            tuner.tune("qkv", act(hidden), [(lw.qkv_f, None) for lw in self.layers])
            tuner.tune("o", act(nq), [(lw.o_w, lw.o_b) for lw in self.layers], accumulate=True)
            tuner.tune("gate_up", act(hidden), [(lw.gu_f, None) for lw in self.layers])
            tuner.tune("down", act(self.intermediate), [(lw.down_w, lw.down_b) for lw in self.layers],
                       accumulate=True)
        else:
            tuner.tune("qkv", act(hidden), [(lw.qkv_w, lw.qkv_b) for lw in self.layers])
            tuner.tune("o", act(nq), [(lw.o_w, lw.o_b) for lw in self.layers])
            tuner.tune("gate_up", act(hidden), [(lw.gu_w, lw.gu_b) for lw in self.layers])
            tuner.tune("down", act(self.intermediate), [(lw.down_w, lw.down_b) for lw in self.layers])
        tuner.tune("lm_head", act(hidden), [(self.lm_head_w, self.lm_head_b)])

    def _linear(self, kind: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if self.gemm_tuner is None:
            return F.linear(x, w, b)
        return self.gemm_tuner.linear(kind, x, w, b)

    def _row(self, kind: str | None, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """o / down: `_linear` (kind None: F.linear, the prefill), or under tensor parallelism the partial
        product summed over the group (one all-reduce, captured in the CUDA graphs), then the bias."""
        if self.group is None:
            return F.linear(x, w, b) if kind is None else self._linear(kind, x, w, b)
        import torch.distributed as dist

        y = F.linear(x, w)
        dist.all_reduce(y, group=self.group)
        return y if b is None else y + b

    def _add_linear(self, kind: str, h: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                    b: torch.Tensor | None) -> None:
        """h += x @ w.T (+ b), in place (the residual add in the GEMM's epilogue: beta = 1)."""
        if self.gemm_tuner is not None and b is None:
            self.gemm_tuner.add_linear(kind, h, x, w)
        else:
            h.addmm_(x, w.t())
            if b is not None:
                h.add_(b)

    def reserve(self, rows: int) -> None:
        """Allocate the split attention's scratch for batches up to `rows` (before graph capture)."""
        self.attn_workspace = K.AttentionWorkspace(rows, self.num_heads, self.num_kv, self.head_dim,
                                                   self.embed.device)

    @staticmethod
    def _param_ptrs(model) -> list[int]:
        return [p.data_ptr() for p in model.parameters()]

    def stale(self) -> bool:
        """True when a parameter was re-pointed since construction (merged views / graphs are stale)."""
        return self._param_ptrs(self._model) != self._ptrs

    def prefill(self, tokens: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, last: torch.Tensor, meta,
                k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """Prefill rows (right-padded [B, T]): tokens/pos [B, T] int64, slots [B*T] int64, last [B]
        (each row's last real token) -> logits [B, V] at those tokens. Attention: `prefill_attention`."""
        from forge.engine.attention import prefill_attention

        b, t = tokens.shape
        nq, nk = self.num_heads * self.head_dim, self.num_kv * self.head_dim
        inter, hd = self.intermediate, self.head_dim
        flat_pos = pos.reshape(-1)
        d = None
        for i, lw in enumerate(self.layers):
            if i == 0:
                h, y = K.add_rmsnorm(self.embed, lw.ln1, lw.ln1_eps, tokens=tokens.reshape(-1))
            else:
                h, y = K.add_rmsnorm(h, lw.ln1, lw.ln1_eps, residual=d, h_out=h)
            qkv = F.linear(y, lw.qkv_w, lw.qkv_b)
            v = qkv[:, nq + nk:]
            q, k = K.rope_store(qkv[:, :nq], qkv[:, nq:nq + nk], v, k_cache[i], v_cache[i], slots, flat_pos,
                                self.cos, self.sin, self.num_heads, q_norm=lw.q_norm, k_norm=lw.k_norm, eps=lw.qk_eps)
            attn = prefill_attention(q.view(b, t, self.num_heads, hd), k.view(b, t, self.num_kv, hd),
                                     v.view(b, t, self.num_kv, hd), k_cache[i], v_cache[i], meta)
            o = self._row(None, attn.reshape(b * t, nq), lw.o_w, lw.o_b)
            h, y = K.add_rmsnorm(h, lw.ln2, lw.ln2_eps, residual=o, h_out=h)
            gu = F.linear(y, lw.gu_w, lw.gu_b)
            d = self._row(None, K.silu_mul(gu[:, :inter], gu[:, inter:]), lw.down_w, lw.down_b)
        rows = torch.arange(b, device=tokens.device) * t + last
        _, y = K.add_rmsnorm(h[rows], self.norm, self.norm_eps, residual=d[rows])
        return F.linear(y, self.lm_head_w, self.lm_head_b)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, block_tables: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, num_layers: int | None = None,
                return_hidden: bool = False) -> torch.Tensor:
        """tokens [B] int, pos [B] int32, tables [B, MB] int32 -> logits [B, V] (k/v written to the caches)."""
        nq, nk = self.num_heads * self.head_dim, self.num_kv * self.head_dim
        inter = self.intermediate
        layers = self.layers[:num_layers] if num_layers is not None else self.layers
        if self.fold_norms:
            return self._forward_folded(tokens, pos, block_tables, k_cache, v_cache, layers, return_hidden)
        h = y = d = None
        for i, lw in enumerate(layers):
            if i == 0:
                h, y = K.add_rmsnorm(self.embed, lw.ln1, lw.ln1_eps, tokens=tokens)
            else:
                h, y = K.add_rmsnorm(h, lw.ln1, lw.ln1_eps, residual=d, h_out=h)
            qkv = self._linear("qkv", y, lw.qkv_w, lw.qkv_b)
            attn = K.attention(qkv[:, :nq], qkv[:, nq:nq + nk], qkv[:, nq + nk:], k_cache[i], v_cache[i],
                               block_tables, pos, self.cos, self.sin, self.num_heads,
                               q_norm=lw.q_norm, k_norm=lw.k_norm, eps=lw.qk_eps, workspace=self.attn_workspace)
            o = self._row("o", attn, lw.o_w, lw.o_b)
            h, y = K.add_rmsnorm(h, lw.ln2, lw.ln2_eps, residual=o, h_out=h)
            gu = self._linear("gate_up", y, lw.gu_w, lw.gu_b)
            d = self._row("down", K.silu_mul(gu[:, :inter], gu[:, inter:]), lw.down_w, lw.down_b)
        if return_hidden:
            return h + d
        h, y = K.add_rmsnorm(h, self.norm, self.norm_eps, residual=d, h_out=h)
        return self._linear("lm_head", y, self.lm_head_w, self.lm_head_b)

    def _forward_folded(self, tokens, pos, block_tables, k_cache, v_cache, layers, return_hidden):
        """`forward` with the norms folded (module docstring): 6 launches per layer instead of 8."""
        nq, nk = self.num_heads * self.head_dim, self.num_kv * self.head_dim
        inter = self.intermediate
        h = self.embed.index_select(0, tokens)  # the residual stream, updated in place below
        for i, lw in enumerate(layers):
            qkv = self._linear("qkv", h, lw.qkv_f, None)
            attn = K.attention(qkv[:, :nq], qkv[:, nq:nq + nk], qkv[:, nq + nk:], k_cache[i], v_cache[i],
                               block_tables, pos, self.cos, self.sin, self.num_heads,
                               q_norm=lw.q_norm, k_norm=lw.k_norm, eps=lw.qk_eps, workspace=self.attn_workspace,
                               norm_x=h, norm_eps=lw.ln1_eps, qkv_bias=lw.qkv_b)
            self._add_linear("o", h, attn, lw.o_w, lw.o_b)
            gu = self._linear("gate_up", h, lw.gu_f, None)
            self._add_linear("down", h, K.silu_mul(gu[:, :inter], gu[:, inter:], norm_x=h, norm_eps=lw.ln2_eps),
                             lw.down_w, lw.down_b)
        if return_hidden:
            return h
        _, y = K.add_rmsnorm(h, self.norm, self.norm_eps)
        return self._linear("lm_head", y, self.lm_head_w, self.lm_head_b)
