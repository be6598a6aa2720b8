"""`ModelRunner`: owns the KV cache, turns scheduled batches into tensors, runs the model.

The cache is allocated once, here. Decode steps on CUDA replay CUDA graphs captured for a set
of batch sizes (the batch is padded up to the nearest one; padded rows write to the scratch
block 0 and their outputs are dropped).
"""

from __future__ import annotations

import logging

import torch

from forge.engine.attention import AttnMeta, decode_attention_torch, prefill_attention, store_kv
from forge.engine.config import EngineConfig
from forge.engine.scheduler import PrefillChunk
from forge.engine.sequence import Sequence
from forge.engine.triton_decode import paged_decode_attention, triton_supported
from forge.models.decoder import CausalLM

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model: CausalLM, config: EngineConfig, device: torch.device, dtype: torch.dtype,
                 max_model_len: int):
        self.config, self.device, self.dtype = config, device, dtype
        self.model = model.to(device=device, dtype=dtype).eval()
        a = model.args
        self.num_layers, self.num_kv, self.head_dim = a.num_hidden_layers, a.num_key_value_heads, a.head_dim
        self.block_size = config.block_size
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        self.num_blocks = self._num_blocks(max_model_len)
        shape = (self.num_layers, self.num_blocks, self.block_size, self.num_kv, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.use_triton = self._pick_backend()
        self.meta: AttnMeta | None = None
        self.pin = device.type == "cuda"
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pre, self._post = _layer_pre, _layer_post
        self.compiled = False
        if config.compile or (config.compile is None and device.type == "cuda"):
            self.compiled = self._try_compile(strict=bool(config.compile))
        if device.type == "cuda" and config.enable_cuda_graphs:
            self._capture_with_fallback()

    # ---- sizing -------------------------------------------------------------------------
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv * self.head_dim * torch.finfo(self.dtype).bits // 8

    def _num_blocks(self, max_model_len: int) -> int:
        c, per_tok = self.config, self.kv_bytes_per_token()
        useful = c.max_num_seqs * max_model_len  # more cache than this can never be used
        if c.kv_cache_tokens is not None:
            tokens = c.kv_cache_tokens
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            a = self.model.args
            # leave room for activations of the largest prefill and the sampler's [B, V] float32 temporaries
            work = c.max_num_batched_tokens * (a.hidden_size * 6 + a.intermediate_size * 3) * 4
            work += c.max_num_seqs * a.vocab_size * 4 * 8 + (1 << 30)
            tokens = min(useful, max(0, int(free * c.gpu_memory_fraction) - work) // per_tok)
        else:
            tokens = useful
        if tokens < max_model_len:
            raise ValueError(f"KV cache budget of {tokens} tokens cannot hold one sequence of max_model_len="
                             f"{max_model_len}; raise kv_cache_tokens / gpu_memory_fraction or lower max_model_len")
        return -(-tokens // self.block_size) + 1  # +1: scratch block 0

    def _pick_backend(self) -> bool:
        want = self.config.attention_backend
        ok = self.device.type == "cuda" and triton_supported(self.head_dim, self.block_size)
        if want == "triton" and not ok:
            raise ValueError("attention_backend='triton' needs CUDA, triton, and power-of-2 head_dim/block_size >= 16")
        if not ok or want == "torch":
            return False
        try:  # one real launch against the torch path: a broken toolchain falls back instead of failing
            err = self._check_triton()
        except Exception as e:  # noqa: BLE001
            if want == "triton":
                raise
            log.warning("triton decode attention unavailable (%s); using the torch path", e)
            return False
        if err > 2e-2:
            log.warning("triton decode attention mismatch (max err %.3g); using the torch path", err)
            return want == "triton"
        return True

    def _check_triton(self) -> float:
        g = torch.Generator(device=self.device).manual_seed(0)
        nb, bs, hkv, d = 9, self.block_size, self.num_kv, self.head_dim
        hq = self.model.args.num_attention_heads
        kc = torch.randn(nb, bs, hkv, d, device=self.device, generator=g).to(self.dtype)
        vc = torch.randn(nb, bs, hkv, d, device=self.device, generator=g).to(self.dtype)
        q = torch.randn(3, 1, hq, d, device=self.device, generator=g).to(self.dtype)
        bt = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0], [8, 7, 6, 5]], dtype=torch.int32, device=self.device)
        lens = torch.tensor([4 * bs, bs + 1, 1], dtype=torch.int32, device=self.device)
        a = paged_decode_attention(q, kc, vc, bt, lens).float()
        b = decode_attention_torch(q, kc, vc, bt, lens).float()
        return (a - b).abs().max().item()

    # ---- attention hook -----------------------------------------------------------------
    def _attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        m = self.meta
        kc, vc = self.k_cache[layer], self.v_cache[layer]
        store_kv(kc, vc, k, v, m.slot_mapping)
        if not m.decode:
            return prefill_attention(q, k, v, kc, vc, m)
        if self.use_triton:
            return paged_decode_attention(q, kc, vc, m.block_tables, m.context_lens)
        return decode_attention_torch(q, kc, vc, m.block_tables, m.context_lens)

    def _tensor(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        t = torch.tensor(data, dtype=dtype)
        if self.pin:
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def _tables(self, seqs: list[Sequence], width: int, rows: int | None = None) -> list[int]:
        flat: list[int] = []
        for s in seqs:
            bt = s.block_table[:width]
            flat += bt
            flat += [0] * (width - len(bt))
        flat += [0] * (((rows or len(seqs)) - len(seqs)) * width)
        return flat

    # ---- prefill ------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, chunks: list[PrefillChunk]) -> torch.Tensor:
        """Compute the chunks' k/v into the cache; logits [len(chunks), V] at each chunk's last token."""
        bs = self.block_size
        t = max(c.end - c.start for c in chunks)
        tokens, pos, slots = [], [], []
        for c in chunks:
            n, pad = c.end - c.start, t - (c.end - c.start)
            tokens += c.seq.token_ids[c.start : c.end] + [0] * pad
            pos += list(range(c.start, c.end)) + [0] * pad
            tbl = c.seq.block_table
            slots += [tbl[p // bs] * bs + p % bs for p in range(c.start, c.end)] + [0] * pad
        has_prefix = any(c.start > 0 for c in chunks)
        width = -(-max(c.end for c in chunks) // bs)
        b = len(chunks)
        self.meta = AttnMeta(
            slot_mapping=self._tensor(slots, torch.int64),
            block_tables=self._tensor(self._tables([c.seq for c in chunks], width), torch.int32).view(b, width)
            if has_prefix else None,
            context_lens=None, decode=False,
            starts=self._tensor([c.start for c in chunks], torch.int64), has_prefix=has_prefix,
        )
        tok = self._tensor(tokens, torch.int64).view(b, t)
        hidden = self.model(tok, self._tensor(pos, torch.int64).view(b, t), attention=self._attention,
                            return_hidden=True)
        last = self._tensor([c.end - c.start - 1 for c in chunks], torch.int64)
        h = hidden[torch.arange(b, device=self.device), last]
        return self.model.lm_head(h)

    # ---- decode -------------------------------------------------------------------------
    def _decode_inputs(self, seqs: list[Sequence], rows: int, width: int):
        bs = self.block_size
        pad = rows - len(seqs)
        tokens = [s.token_ids[-1] for s in seqs] + [0] * pad
        pos = [s.num_computed for s in seqs] + [0] * pad
        slots = [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, pos)] + [0] * pad
        lens = [p + 1 for p in pos]
        return tokens, pos, slots, lens, self._tables(seqs, width, rows)

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One new token per sequence (its k/v goes into the cache); logits [len(seqs), V]."""
        b = len(seqs)
        gb = next((x for x in sorted(self.graphs) if x >= b), None)
        if gb is not None:
            tokens, pos, slots, lens, tables = self._decode_inputs(seqs, gb, self.max_blocks_per_seq)
            st = self._static
            st["tokens"][:gb].copy_(self._tensor(tokens, torch.int64).view(gb, 1))
            st["pos"][:gb].copy_(self._tensor(pos, torch.int64).view(gb, 1))
            st["slots"][:gb].copy_(self._tensor(slots, torch.int64))
            st["lens"][:gb].copy_(self._tensor(lens, torch.int32))
            st["tables"][:gb].copy_(self._tensor(tables, torch.int32).view(gb, -1))
            graph, out = self.graphs[gb]
            graph.replay()
            return out[:b]
        width = max(len(s.block_table) for s in seqs)
        tokens, pos, slots, lens, tables = self._decode_inputs(seqs, b, width)
        self.meta = AttnMeta(self._tensor(slots, torch.int64), self._tensor(tables, torch.int32).view(b, width),
                             self._tensor(lens, torch.int32), decode=True)
        return self.decode_forward(self._tensor(tokens, torch.int64).view(b, 1), self._tensor(pos, torch.int64).view(b, 1))

    def graph_sizes(self) -> list[int]:
        sizes = self.config.cuda_graph_batch_sizes
        if not sizes:
            sizes, x = [], 1
            while x < self.config.max_num_seqs:
                sizes.append(x)
                x = x * 2 if x < 16 else x + 16
            sizes.append(self.config.max_num_seqs)
        return sorted({int(s) for s in sizes if 0 < int(s) <= self.config.max_num_seqs}, reverse=True)

    # ---- the decode forward ---------------------------------------------------------------
    def decode_forward(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """`CausalLM.forward` for decode, layer by layer through the model's own modules, so the
        norm/RoPE/MLP halves of each layer can be compiled while attention stays ours."""
        m = self.model
        x = m.model.embed_tokens(tokens)
        cos, sin = m.model.rotary_emb(pos)
        for i, layer in enumerate(m.model.layers):
            q, k, v = self._pre(layer, x, cos, sin)
            x = self._post(layer, x, self._attention(i, q, k, v))
        return m.lm_head(m.model.norm(x))[:, -1]

    def _try_compile(self, strict: bool) -> bool:
        """Compile the per-layer halves once (shared by all layers: modules are inputs), then check
        one decode step against the eager one; any failure or mismatch keeps the eager path."""
        try:
            pre = torch.compile(_layer_pre, dynamic=True)
            post = torch.compile(_layer_post, dynamic=True)
            with torch.inference_mode():
                b = min(4, self.config.max_num_seqs)
                self.alloc_static(b)
                st = self._static
                st["tokens"].random_(0, self.model.args.vocab_size)
                st["pos"].copy_(torch.arange(b, device=self.device).view(b, 1))
                st["slots"].copy_(torch.arange(b, device=self.device))  # scratch block 0: nothing live
                st["lens"].copy_(st["pos"].view(-1).int() + 1)
                ref = self.run_static(b).float()
                self._pre, self._post = pre, post
                got = self.run_static(b).float()
            err = ((got - ref).norm() / ref.norm().clamp_min(1e-6)).item()
            if not err < 2e-2:
                raise RuntimeError(f"compiled decode differs from eager (relative error {err:.3g})")
            log.info("compiled decode layers (relative error vs eager %.2g)", err)
            return True
        except Exception as e:  # noqa: BLE001
            self._pre, self._post = _layer_pre, _layer_post
            if strict:
                raise
            log.warning("torch.compile of the decode layers failed, running them eagerly: %s", e)
            return False

    def alloc_static(self, max_batch: int) -> None:
        """The decode inputs every captured graph reads (graph b uses the first b rows)."""
        dev, mb = self.device, max_batch
        self._static = {
            "tokens": torch.zeros(mb, 1, dtype=torch.int64, device=dev),
            "pos": torch.zeros(mb, 1, dtype=torch.int64, device=dev),
            "slots": torch.zeros(mb, dtype=torch.int64, device=dev),
            "lens": torch.ones(mb, dtype=torch.int32, device=dev),
            "tables": torch.zeros(mb, self.max_blocks_per_seq, dtype=torch.int32, device=dev),
        }

    def run_static(self, b: int) -> torch.Tensor:
        """Decode forward over the first b rows of the static inputs (what a graph captures)."""
        st = self._static
        self.meta = AttnMeta(st["slots"][:b], st["tables"][:b], st["lens"][:b], decode=True)
        return self.decode_forward(st["tokens"][:b], st["pos"][:b])

    def _capture_with_fallback(self) -> None:
        """Graphs of the compiled layers; on failure graphs of the eager layers; else no graphs."""
        for attempt in ("compiled", "eager"):
            if attempt == "compiled" and not self.compiled:
                continue
            try:
                self.capture_graphs()
                return
            except Exception as e:  # noqa: BLE001
                log.warning("CUDA graph capture (%s layers) failed: %s", attempt, e)
                self.graphs.clear()
                self._pre, self._post, self.compiled = _layer_pre, _layer_post, False
                torch.cuda.synchronize(self.device)
        log.warning("running decode without CUDA graphs")

    @torch.inference_mode()
    def capture_graphs(self) -> None:
        sizes = self.graph_sizes()
        self.alloc_static(sizes[0])
        self.model.model.rotary_emb.tables(self.model.args.max_position_embeddings, self.device)  # before capture
        pool = None
        for b in sizes:  # largest first, so smaller graphs reuse its memory pool
            self.run_static(b)  # warm-up: kernel selection, triton compilation
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool):
                out = self.run_static(b)
            pool = pool or g.pool()
            self.graphs[b] = (g, out)
        torch.cuda.synchronize(self.device)
        log.info("captured CUDA graphs for decode batch sizes %s", sorted(self.graphs))

    @torch.inference_mode()
    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        if pairs:
            src = torch.tensor([p[0] for p in pairs], device=self.device)
            dst = torch.tensor([p[1] for p in pairs], device=self.device)
            self.k_cache[:, dst] = self.k_cache[:, src]
            self.v_cache[:, dst] = self.v_cache[:, src]


def _layer_pre(layer: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """First half of `DecoderLayer.forward`: norm, q/k/v projections, q/k norm, RoPE."""
    return layer.self_attn.project_qkv(layer.input_layernorm(x), cos, sin)


def _layer_post(layer: torch.nn.Module, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """Second half: output projection, residual, norm, MLP, residual."""
    h = x + layer.self_attn.o_proj(attn.reshape(x.shape[0], x.shape[1], -1))
    return h + layer.mlp(layer.post_attention_layernorm(h))
