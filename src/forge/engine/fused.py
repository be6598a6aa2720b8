"""The decode forward as fused Triton kernels plus merged projections (see `forge.engine.kernels`).

`FusedDecode(model)` computes `CausalLM.forward` for one new token per row straight from the
model's own parameters. q/k/v (and gate/up) run as one GEMM each: at construction the three
(two) weight matrices are made views of one buffer (a no-op when they already are; otherwise
the parameters are re-pointed into a fresh buffer, no extra memory). In-place updates of the
parameters (`copy_`, `load_state_dict`, `Generator.update_weights`) therefore reach the merged
buffer. Re-pointing a parameter elsewhere (`p.data = t`) does not: `stale()` notices, and the
runner then rebuilds this object and re-captures its CUDA graphs.
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


class FusedDecode:
    def __init__(self, model, max_positions: int):
        a = model.args
        self.num_heads, self.num_kv, self.head_dim = a.num_attention_heads, a.num_key_value_heads, a.head_dim
        self.intermediate = a.intermediate_size
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
            o = F.linear(attn.reshape(b * t, nq), lw.o_w, lw.o_b)
            h, y = K.add_rmsnorm(h, lw.ln2, lw.ln2_eps, residual=o, h_out=h)
            gu = F.linear(y, lw.gu_w, lw.gu_b)
            d = F.linear(K.silu_mul(gu[:, :inter], gu[:, inter:]), lw.down_w, lw.down_b)
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
        h = y = d = None
        for i, lw in enumerate(layers):
            if i == 0:
                h, y = K.add_rmsnorm(self.embed, lw.ln1, lw.ln1_eps, tokens=tokens)
            else:
                h, y = K.add_rmsnorm(h, lw.ln1, lw.ln1_eps, residual=d, h_out=h)
            qkv = F.linear(y, lw.qkv_w, lw.qkv_b)
            attn = K.attention(qkv[:, :nq], qkv[:, nq:nq + nk], qkv[:, nq + nk:], k_cache[i], v_cache[i],
                               block_tables, pos, self.cos, self.sin, self.num_heads,
                               q_norm=lw.q_norm, k_norm=lw.k_norm, eps=lw.qk_eps, workspace=self.attn_workspace)
            o = F.linear(attn, lw.o_w, lw.o_b)
            h, y = K.add_rmsnorm(h, lw.ln2, lw.ln2_eps, residual=o, h_out=h)
            gu = F.linear(y, lw.gu_w, lw.gu_b)
            d = F.linear(K.silu_mul(gu[:, :inter], gu[:, inter:]), lw.down_w, lw.down_b)
        if return_hidden:
            return h + d
        h, y = K.add_rmsnorm(h, self.norm, self.norm_eps, residual=d, h_out=h)
        return F.linear(y, self.lm_head_w, self.lm_head_b)
