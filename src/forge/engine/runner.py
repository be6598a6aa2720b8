"""`ModelRunner`: owns the KV cache, turns scheduled batches into tensors, runs the model.

The cache is allocated once, here. Two decode paths:

- fused (CUDA with Triton, the default there): `forge.engine.fused_decode.FusedDecodeRunner`,
  this class's mixin (the Triton decode layers and in-graph sampling, one CUDA graph per batch size).
- unfused (CPU: the reference; CUDA with `fused_decode=False` or without Triton): the model's own
  modules layer by layer, attention through `forge.engine.attention` / the Triton paged kernel,
  CUDA graphs of the forward, the sampler outside. (A torch.compile'd copy of the layer math was
  removed: the fused path is the fast one on CUDA, and a third copy of the layer was one too many.)

Padded rows of a captured batch size write their k/v to the scratch block 0; their outputs
are dropped.
"""

from __future__ import annotations

import logging
import time

import torch

from forge.engine.attention import AttnMeta, decode_attention_torch, prefill_attention, store_kv
from forge.engine.config import EngineConfig
from forge.engine.fused_decode import FusedDecodeRunner, _layer_post, _layer_pre
from forge.engine.scheduler import PrefillChunk
from forge.engine.sequence import Sequence
from forge.engine.tp import TPGroup
from forge.engine.triton_decode import paged_decode_attention, triton_supported
from forge.models.decoder import CausalLM

log = logging.getLogger(__name__)


class ModelRunner(FusedDecodeRunner):
    def __init__(self, model: CausalLM, config: EngineConfig, device: torch.device, dtype: torch.dtype,
                 max_model_len: int, tp: TPGroup | None = None):
        self.config, self.device, self.dtype = config, device, dtype
        self.tp = tp  # tensor parallel: `model` is this rank's shard (forge.engine.tp); None: one process
        if tp is not None:
            _check_tp_config(config, tp)
        self.model = model.to(device=device, dtype=dtype).eval()
        a = model.args
        tp_size = tp.size if tp is not None else 1
        self.num_layers, self.num_kv, self.head_dim = a.num_hidden_layers, a.num_key_value_heads // tp_size, a.head_dim
        self.num_heads = a.num_attention_heads // tp_size
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        # before the KV budget: the folded copies take memory
        self.fold_norms = self._want_fold() if tp is None else False
        self.num_blocks = self._num_blocks(max_model_len)
        shape = (self.num_layers, self.num_blocks, self.block_size, self.num_kv, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.pin = device.type == "cuda"
        self.meta: AttnMeta | None = None
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pre, self._post = _layer_pre, _layer_post
        self.fused = None  # FusedDecode when the fused decode path is on
        self._prefill_graphs: dict[tuple[int, int], tuple] = {}
        self._prefill_pool = None
        self.prefill_capture_log: list[dict] = []
        self.use_triton = False
        self.gemm_tuner = None  # forge.engine.cublaslt.GemmTuner once the fused decode graphs are captured
        if config.tune_gemms and not (device.type == "cuda" and config.enable_cuda_graphs
                                      and self.dtype in (torch.bfloat16, torch.float16)):
            raise ValueError("EngineConfig.tune_gemms=True needs CUDA with enable_cuda_graphs and a bfloat16/float16 "
                             f"model (got device {device.type}, dtype {self.dtype}, "
                             f"enable_cuda_graphs={config.enable_cuda_graphs})")
        if config.tune_gemms:
            from forge.engine.cublaslt import GemmTuner

            if not GemmTuner.supported(device, self.dtype):  # here, not inside the graph capture's fallback
                raise ValueError("EngineConfig.tune_gemms=True: cuBLASLt was not found in this process "
                                 "(Linux CUDA build of torch needed); leave tune_gemms unset to fall back to F.linear")
        if self._want_fused():
            try:
                self._setup_fused()
            except Exception as e:
                # no silent fallback to a several-times slower decode (and under TP the ranks must agree on
                # the path): the unfused one is there when asked for
                if config.fused_decode:
                    raise
                where = f" on tensor-parallel rank {tp.rank}" if tp is not None else ""
                raise RuntimeError(f"the fused decode failed to start{where}: {e}. Set EngineConfig.fused_decode=False "
                                   "(policy.engine_args.fused_decode: false) to run the unfused reference decode") from e
        if self.fused is None:
            self.use_triton = self._pick_backend()
            if device.type == "cuda" and config.enable_cuda_graphs:
                self._capture_or_run_without_graphs()

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
            if self.fold_norms:
                from forge.engine.fused import fold_bytes

                work += fold_bytes(self.model)
            tokens = min(useful, max(0, int(free * c.gpu_memory_fraction) - work) // per_tok)
        else:
            tokens = useful
        if tokens < max_model_len:
            raise ValueError(f"KV cache budget of {tokens} tokens cannot hold one sequence of max_model_len="
                             f"{max_model_len}; raise kv_cache_tokens / gpu_memory_fraction or lower max_model_len")
        if self.tp is not None:  # rank 0 hands out the block ids: every rank's cache must hold them
            tokens = self.tp.min_int(tokens)
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
        hq = self.num_heads
        kc = torch.randn(nb, bs, hkv, d, device=self.device, generator=g).to(self.dtype)
        vc = torch.randn(nb, bs, hkv, d, device=self.device, generator=g).to(self.dtype)
        q = torch.randn(3, 1, hq, d, device=self.device, generator=g).to(self.dtype)
        bt = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0], [8, 7, 6, 5]], dtype=torch.int32, device=self.device)
        lens = torch.tensor([4 * bs, bs + 1, 1], dtype=torch.int32, device=self.device)
        a = paged_decode_attention(q, kc, vc, bt, lens).float()
        b = decode_attention_torch(q, kc, vc, bt, lens).float()
        return (a - b).abs().max().item()

    # ---- attention hook (prefill, unfused decode) ----------------------------------------
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
        if self.fused is not None and self.fused.stale():
            self._refresh_fused()
        bs = self.block_size
        t = max(c.end - c.start for c in chunks)
        has_prefix = any(c.start > 0 for c in chunks)
        b = len(chunks)
        key = self._prefill_graph_key(b, t, has_prefix)
        if key is not None:  # padded to a captured (rows, length) bucket
            b, t = key
        tokens, pos, slots = [], [], []
        for c in chunks:
            pad = t - (c.end - c.start)
            tokens += c.seq.token_ids[c.start : c.end] + [0] * pad
            pos += list(range(c.start, c.end)) + [0] * pad
            tbl = c.seq.block_table
            slots += [tbl[p // bs] * bs + p % bs for p in range(c.start, c.end)] + [0] * pad
        last = [c.end - c.start - 1 for c in chunks]
        if key is not None:
            extra = b - len(chunks)
            tokens += [0] * (extra * t)
            pos += [0] * (extra * t)
            slots += [0] * (extra * t)
            last += [0] * extra
            if self.tp is not None:
                self.tp.send_plan(("prefill_graph", key, tokens, pos, slots, last))
            return self._prefill_replay(key, tokens, pos, slots, last)[: len(chunks)]
        width = -(-max(c.end for c in chunks) // bs)
        tables = self._tables([c.seq for c in chunks], width) if has_prefix else None
        plan = ("prefill", tokens, pos, slots, last, [c.start for c in chunks], tables, b, t, width)
        if self.tp is not None:
            self.tp.send_plan(plan)
        return self.run_prefill(*plan[1:])

    @torch.inference_mode()
    def run_prefill(self, tokens: list[int], pos: list[int], slots: list[int], last: list[int], starts: list[int],
                    tables: list[int] | None, b: int, t: int, width: int) -> torch.Tensor:
        """The eager prefill of `b` right-padded rows of `t` tokens (what `prefill` plans; a tensor-parallel
        follower runs rank 0's plan through here). `tables`: the rows' block tables when some row
        continues cached context."""
        has_prefix = tables is not None
        self.meta = AttnMeta(
            slot_mapping=self._tensor(slots, torch.int64),
            block_tables=self._tensor(tables, torch.int32).view(b, width) if has_prefix else None,
            context_lens=None, decode=False,
            starts=self._tensor(starts, torch.int64), has_prefix=has_prefix,
        )
        tok = self._tensor(tokens, torch.int64).view(b, t)
        pos_t = self._tensor(pos, torch.int64).view(b, t)
        last = self._tensor(last, torch.int64)
        if self.fused is not None and self.config.fused_prefill is not False:
            return self.fused.prefill(tok, pos_t, self.meta.slot_mapping, last, self.meta, self.k_cache, self.v_cache)
        hidden = self.model(tok, pos_t, attention=self._attention, return_hidden=True)
        h = hidden[torch.arange(b, device=self.device), last]
        return self.model.lm_head(h)

    # ---- prefill CUDA graphs (fused path, prompts without cached prefix) -------------------
    MAX_PREFILL_GRAPHS = 32

    def _prefill_graph_key(self, b: int, t: int, has_prefix: bool) -> tuple[int, int] | None:
        """The (rows, length) bucket a prefill pads to for a graph replay, or None (run it eagerly)."""
        c = self.config
        if (self.fused is None or has_prefix or c.fused_prefill is False or not c.prefill_cuda_graphs
                or self.device.type != "cuda" or not c.enable_cuda_graphs):
            return None
        tb = -(-t // 64) * 64 if t > 32 else (16 if t <= 16 else 32)
        bb = next((x for x in sorted(self.graph_sizes()) if x >= b), None)
        if bb is None or bb * tb > max(c.max_num_batched_tokens, 2048) * 2:
            return None
        key = (bb, tb)
        if key not in self._prefill_graphs and len(self._prefill_graphs) >= self.MAX_PREFILL_GRAPHS:
            return None
        return key

    def _capture_stream(self) -> torch.cuda.Stream:
        if getattr(self, "_side_stream", None) is None:
            self._side_stream = torch.cuda.Stream(self.device)
        return self._side_stream

    def _prefill_replay(self, key: tuple[int, int], tokens: list, pos: list, slots: list, last: list) -> torch.Tensor:
        entry = self._prefill_graphs.get(key)
        if entry is None:
            entry = self._prefill_graphs[key] = self._capture_prefill(*key)
        tok_s, pos_s, slot_s, last_s, graph, logits = entry
        b, t = key
        ints = self._tensor(tokens + pos + slots + last, torch.int64)
        n = b * t
        tok_s.view(-1).copy_(ints[:n])
        pos_s.view(-1).copy_(ints[n: 2 * n])
        slot_s.copy_(ints[2 * n: 3 * n])
        last_s.copy_(ints[3 * n:])
        graph.replay()
        return logits

    def _capture_prefill(self, b: int, t: int):
        dev = self.device
        tok, pos = torch.zeros(b, t, dtype=torch.int64, device=dev), torch.zeros(b, t, dtype=torch.int64, device=dev)
        slots, last = torch.zeros(b * t, dtype=torch.int64, device=dev), torch.zeros(b, dtype=torch.int64, device=dev)
        meta = AttnMeta(slot_mapping=slots, block_tables=None, context_lens=None, decode=False, has_prefix=False)
        run = lambda: self.fused.prefill(tok, pos, slots, last, meta, self.k_cache, self.v_cache)  # noqa: E731
        t0 = time.perf_counter()
        run()  # warm-up (k/v of the zero inputs land in the scratch block 0)
        t1 = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        # captured mid-run: torch.cuda.graph() would also gc.collect() and empty the allocator cache (tens
        # of ms with a large Python heap); a side stream ordered after the current one is all it needs
        side, cur = self._capture_stream(), torch.cuda.current_stream(dev)
        side.wait_stream(cur)
        with torch.cuda.stream(side):
            graph.capture_begin(pool=self._prefill_pool, capture_error_mode="thread_local")
            try:
                logits = run()
            finally:
                graph.capture_end()
        cur.wait_stream(side)
        self._prefill_pool = self._prefill_pool or graph.pool()
        t2 = time.perf_counter()
        # host seconds: what a first prefill of this bucket costs on top of a replay (docs/perf/NOTES_generate.md)
        self.prefill_capture_log.append({"rows": b, "tokens": t, "warmup_ms": (t1 - t0) * 1e3,
                                         "capture_ms": (t2 - t1) * 1e3})
        log.info("captured a prefill CUDA graph for %d rows x %d tokens (%.0f ms)", b, t, (t2 - t0) * 1e3)
        return tok, pos, slots, last, graph, logits


    # =====================================================================================
    # unfused decode
    # =====================================================================================
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
        """Unfused path: one new token per sequence (its k/v goes into the cache); logits [len(seqs), V]."""
        b = len(seqs)
        gb = next((x for x in sorted(self.graphs) if x >= b), None)
        width = self.max_blocks_per_seq if gb is not None else max(len(s.block_table) for s in seqs)
        plan = ("decode", b, gb, width, *self._decode_inputs(seqs, gb or b, width))
        if self.tp is not None:
            self.tp.send_plan(plan)
        return self.run_decode(*plan[1:])

    @torch.inference_mode()
    def run_decode(self, b: int, gb: int | None, width: int, tokens: list[int], pos: list[int], slots: list[int],
                   lens: list[int], tables: list[int]) -> torch.Tensor:
        """One decode step of `b` rows from their inputs (`_decode_inputs`), in the captured graph of batch
        size `gb` when there is one; what `decode` plans, and what a tensor-parallel follower runs."""
        if gb is not None and gb not in self.graphs:  # a follower without that graph: the same rows, eagerly
            b, gb = gb, None
        if gb is not None:
            st = self._static
            st["tokens"][:gb].copy_(self._tensor(tokens, torch.int64).view(gb, 1))
            st["pos"][:gb].copy_(self._tensor(pos, torch.int64).view(gb, 1))
            st["slots"][:gb].copy_(self._tensor(slots, torch.int64))
            st["lens"][:gb].copy_(self._tensor(lens, torch.int32))
            st["tables"][:gb].copy_(self._tensor(tables, torch.int32).view(gb, -1))
            graph, out = self.graphs[gb]
            graph.replay()
            return out[:b]
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

    def _capture_or_run_without_graphs(self) -> None:
        try:
            self.capture_graphs()
        except Exception as e:  # noqa: BLE001
            log.warning("CUDA graph capture failed, running decode without CUDA graphs: %s", e)
            self.graphs.clear()
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def capture_graphs(self) -> None:
        sizes = self.graph_sizes()
        self.alloc_static(sizes[0])
        self.model.model.rotary_emb.tables(self.model.args.max_position_embeddings, self.device)  # before capture
        pool = None
        for b in sizes:  # largest first, so smaller graphs reuse its memory pool
            self.run_static(b)  # warm-up: kernel selection, triton compilation
            g = torch.cuda.CUDAGraph()
            # tensor parallel: the NCCL all-reduces are captured; NCCL's watchdog thread queries events while
            # this thread captures, which the default ("global") capture mode would turn into an error
            with torch.cuda.graph(g, pool, capture_error_mode="thread_local" if self.tp is not None else "global"):
                out = self.run_static(b)
            pool = pool or g.pool()
            self.graphs[b] = (g, out)
        torch.cuda.synchronize(self.device)
        log.info("captured CUDA graphs for decode batch sizes %s", sorted(self.graphs))

    @torch.inference_mode()
    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        if pairs and self.tp is not None and self.tp.leader:
            self.tp.send_plan(("copy_blocks", pairs))
        if pairs:
            src = torch.tensor([p[0] for p in pairs], device=self.device)
            dst = torch.tensor([p[1] for p in pairs], device=self.device)
            self.k_cache[:, dst] = self.k_cache[:, src]
            self.v_cache[:, dst] = self.v_cache[:, src]


def _check_tp_config(config: EngineConfig, tp: TPGroup) -> None:
    """Tensor parallelism runs the fused decode (all-reduces and rank 0's sampled tokens captured in its
    CUDA graphs) or the unfused one; norm folding and cuBLASLt tuning are not supported with it: asking
    for them is an error, not a silent fallback (unset, they are off)."""
    for key in ("fold_norms", "tune_gemms"):
        if getattr(config, key):
            raise ValueError(f"EngineConfig.{key}=True is not supported with tensor_parallel_size={tp.size}; "
                             f"leave {key} unset")
