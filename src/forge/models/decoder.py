"""One readable decoder for the Llama 3, Qwen2/2.5 and Qwen3 families.

Module and parameter names equal HF's (`model.layers.3.self_attn.q_proj.weight`, `lm_head.weight`),
so HF safetensors load with no renaming.

Attention is pluggable: `forward(..., attention=fn)` where `fn(layer_idx, q, k, v) -> out`
receives q `[B, T, Hq, D]`, k/v `[B, T, Hkv, D]` after RoPE (and q/k norm) and returns
`[B, T, Hq, D]`. Training uses `forge.models.attention` (causal, or packed documents that never
attend across each other); the inference engine passes its own function that writes k/v into
its KV cache and attends over it. The trainer, the reference model and the generator therefore
run exactly the same weights and math.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from forge.models.args import ModelArgs

AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class LayerAgnosticAttention:
    """An `AttentionFn` that is the same for every layer (training attention): `fn(q, k, v)`.

    The decoder does not read `layer_idx` for it, so a compiled `DecoderLayer` has no guard on
    the layer index and all layers share one graph (otherwise torch.compile specialises on each
    layer's integer index, recompiles per layer and falls back to eager past its recompile limit).
    """

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]):
        self.fn = fn

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.fn(q, k, v)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype:
            # one fused kernel each way in eager (float32 statistics, one rounding at the end);
            # torch.compile decomposes it into the same fused reduction
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        dtype = x.dtype  # mixed dtypes (e.g. bf16 activations, fp32 weight under autocast): HF's recipe
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    d = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    sc = args.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind in (None, "default"):
        return inv.float()
    if kind == "linear":
        return (inv / sc["factor"]).float()
    if kind == "llama3":
        factor, low, high = sc["factor"], sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
        old_ctx = sc.get("original_max_position_embeddings", 8192)
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(is_mid, mid, scaled).float()
    raise ValueError(f"rope_scaling type '{kind}' is not supported (supported: default, linear, llama3)")


class RotaryEmbedding(nn.Module):
    """cos/sin tables indexed by position; HF's rotate-half convention."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def tables(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        c = self._cache
        if c is None or c[0].shape[0] < n or c[0].device != device:
            n = max(n, self.args.max_position_embeddings)
            t = torch.arange(n, device=device, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq.to(device))
            emb = torch.cat([freqs, freqs], dim=-1)
            self._cache = c = (emb.cos(), emb.sin())
        return c

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, T, 1, D] (float32). No host sync (CUDA-graph safe)."""
        c = self._cache
        if c is None or c[0].device != positions.device:
            c = self.tables(self.args.max_position_embeddings, positions.device)
        return c[0][positions].unsqueeze(2), c[1][positions].unsqueeze(2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin in float32 (cos/sin are float32), rounded once to x's dtype."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    rotated = torch.cat([-x2, x1], dim=-1)
    # type promotion does the upcast inside the multiply (no separate .float() copies)
    return torch.addcmul(x * cos, rotated, sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        h, d = args.hidden_size, args.head_dim
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=args.attention_bias)
        self.k_proj = nn.Linear(h, self.n_kv * d, bias=args.attention_bias)
        self.v_proj = nn.Linear(h, self.n_kv * d, bias=args.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=False)
        if args.qk_norm:
            self.q_norm = RMSNorm(d, args.rms_norm_eps)
            self.k_norm = RMSNorm(d, args.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def project_qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        b, t, _ = x.shape
        # -1, not n_heads: under tensor parallelism (applied from outside) a rank holds a slice of the heads
        q = self.q_proj(x).view(b, t, -1, self.head_dim)
        k = self.k_proj(x).view(b, t, -1, self.head_dim)
        v = self.v_proj(x).view(b, t, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention: AttentionFn) -> torch.Tensor:
        q, k, v = self.project_qkv(x, cos, sin)
        if isinstance(attention, LayerAgnosticAttention):
            out = attention.fn(q, k, v)
        else:
            out = attention(self.layer_idx, q, k, v)
        return self.o_proj(out.reshape(x.shape[0], x.shape[1], -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        h, i = args.hidden_size, args.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=args.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=args.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=args.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """One block; the unit of FSDP2 wrapping and activation checkpointing."""

    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, layer_idx)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention: AttentionFn) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attention)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(args)


class CausalLM(nn.Module):
    """`forward(tokens, positions=None, document_ids=None, attention=None) -> logits`.

    - plain causal: `forward(tokens)`
    - packed documents: `forward(tokens, positions, document_ids)` with positions restarting at 0
      for each document and document_ids giving each token's document (padding: its own id);
      attention never crosses documents.
    - custom attention (the inference engine): `forward(tokens, positions, attention=fn)`.
    `return_hidden=True` returns the final normed hidden states instead of logits (the
    chunked log-prob helper applies `lm_head` itself, chunk by chunk).
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = DecoderModel(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.activation_checkpointing = False

    @property
    def config(self) -> ModelArgs:
        return self.args

    def tie_weights(self) -> None:
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        attention: AttentionFn | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        from forge.models.attention import make_training_attention

        b, t = tokens.shape
        if positions is None:
            positions = torch.arange(t, device=tokens.device).unsqueeze(0).expand(b, t)
        if attention is None:
            attention = make_training_attention(document_ids, t)
        x = self.model.embed_tokens(tokens)
        cos, sin = self.model.rotary_emb(positions)
        for layer in self.model.layers:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, attention, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attention)
        x = self.model.norm(x)
        return x if return_hidden else self.lm_head(x)

    def init_weights(self, std: float = 0.02, seed: int | None = None) -> None:
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.copy_(torch.randn(p.shape, generator=g) * std)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
