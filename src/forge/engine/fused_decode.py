"""The fused decode path of `ModelRunner` (CUDA with Triton, the default there).

`forge.engine.fused.FusedDecode` (the Triton decode layers) and the sampler's two kernels run
together, captured in one CUDA graph per batch size. The decode inputs live on the device: a step
of the same batch as the last one moves them on with one small kernel (sampled tokens in,
positions + 1) and uploads only block-table entries that changed; a new batch uploads everything
once. Each step copies the sampled tokens and logprobs to the host in one copy (`DecodeHandle`),
which the engine may read after it has queued the next step.

`FusedDecodeRunner` is a mixin of `ModelRunner` (forge.engine.runner): it uses the runner's
cache, block tables and prefill graphs; the runner owns sizing, prefill and the unfused decode.
"""

from __future__ import annotations

import logging
import os
import time

import torch
import torch.distributed as dist

from forge.engine import kernels as K
from forge.engine.attention import AttnMeta
from forge.engine.sampler import SamplingBatch, _seed63
from forge.engine.sequence import Sequence

log = logging.getLogger(__name__)

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class DecodeHandle:
    """The tokens / logprobs of one launched decode step; `result()` waits for them."""

    def __init__(self, host: torch.Tensor, b: int, mb: int, event=None, chainable: bool = False):
        self.host, self.b, self.mb, self.event, self.chainable = host, b, mb, event, chainable

    def result(self) -> tuple[list[int], list[float]]:
        if self.event is not None:
            self.event.synchronize()
        tok = self.host[: self.mb * 8].view(torch.int64)[: self.b].tolist()
        lp = self.host[self.mb * 8:].view(torch.float32)[: self.b].tolist()
        return tok, lp


# The eager decoder layer in two halves around attention: the unfused decode runs them (or their
# compiled copies in forge.engine.runner), and the fused path checks itself against them.
def _layer_pre(layer: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """First half of `DecoderLayer.forward`: norm, q/k/v projections, q/k norm, RoPE."""
    return layer.self_attn.project_qkv(layer.input_layernorm(x), cos, sin)


def _layer_post(layer: torch.nn.Module, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """Second half: output projection, residual, norm, MLP, residual."""
    h = x + layer.self_attn.o_proj(attn.reshape(x.shape[0], x.shape[1], -1))
    return h + layer.mlp(layer.post_attention_layernorm(h))


class FusedDecodeRunner:
    """The fused decode half of `ModelRunner` (see the module docstring)."""

    def _want_fused(self) -> bool:
        want = self.config.fused_decode
        if want is False or not K.HAS_TRITON:
            if want:
                raise ValueError("fused_decode=True needs triton")
            return False
        if self.device.type != "cuda" and not (want and _interpreting()):
            if want:
                raise ValueError("fused_decode=True needs CUDA (or TRITON_INTERPRET=1 for tests)")
            return False
        ok = self.model.args.num_attention_heads % self.num_kv == 0 and self.head_dim % 2 == 0
        if not ok and want:
            raise ValueError("fused_decode=True needs num_attention_heads % num_key_value_heads == 0, even head_dim")
        return ok

    FOLD_AUTO_MAX_BYTES = 1 << 30

    def _want_fold(self) -> bool:
        """EngineConfig.fold_norms: None = on for the fused decode on CUDA when the folded copies of the
        q/k/v and gate/up weights take <= 1 GiB (small models, where the norm launches are a visible
        share of a step; docs/perf/NOTES_generate.md) and the gate/up projections have no bias."""
        want = self.config.fold_norms
        if want is False:
            return False
        if not self._want_fused():
            if want:
                raise ValueError("EngineConfig.fold_norms=True needs the fused decode path (CUDA with triton, "
                                 "fused_decode not False)")
            return False
        if want:
            return True
        from forge.engine.fused import fold_bytes

        gu_bias = any(layer.mlp.gate_proj.bias is not None for layer in self.model.model.layers)
        return self.device.type == "cuda" and not gu_bias and fold_bytes(self.model) <= self.FOLD_AUTO_MAX_BYTES

    def _setup_fused(self) -> None:
        from forge.engine.fused import FusedDecode

        self.fused = FusedDecode(self.model, self.model.args.max_position_embeddings, fold_norms=self.fold_norms,
                                 group=self.tp.group if self.tp is not None else None)
        self.fused.reserve(self.config.max_num_seqs)
        self._alloc_state(self.config.max_num_seqs)
        err = self._check_fused()
        tol = 1e-3 if self.dtype == torch.float32 else 5e-2
        if not err < tol:
            raise RuntimeError(f"fused decode differs from the eager layers (relative error {err:.3g})")
        log.info("fused decode path on (self-check relative error %.2g)", err)
        if self.device.type == "cuda":
            self._warm_prefill()
        if self.device.type == "cuda" and self.config.enable_cuda_graphs:
            try:
                self._capture_fused()
            except Exception as e:  # noqa: BLE001
                log.warning("CUDA graph capture of the fused decode failed (%s); running it without graphs", e)
                self.graphs.clear()
                self.fused.gemm_tuner = None
                torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def _warm_prefill(self) -> None:
        """One prefill of a full `max_num_batched_tokens` chunk at start-up (vLLM's dummy run): the
        allocator's segments for the largest activations and the GEMM heuristics for that M are then
        in place before the first real prompt, instead of costing its step ~60 ms; with prefill
        graphs on, that chunk's bucket (rows x 128 tokens, the shape a full chunk of short prompts
        takes) is captured here too, instead of costing the first such step ~30 ms
        (docs/perf/NOTES_generate.md). k/v of the zero tokens land in the scratch block 0."""
        t = min(128, self.max_model_len)
        b = max(1, self.config.max_num_batched_tokens // t)
        t0 = time.perf_counter()
        key = self._prefill_graph_key(b, t, False) if self.config.enable_cuda_graphs else None
        if key is not None:
            self._prefill_graphs[key] = self._capture_prefill(*key)
        else:
            dev = self.device
            tok = torch.zeros(b, t, dtype=torch.int64, device=dev)
            pos = torch.arange(t, device=dev).repeat(b, 1)
            slots = torch.zeros(b * t, dtype=torch.int64, device=dev)
            last = torch.full((b,), t - 1, dtype=torch.int64, device=dev)
            meta = AttnMeta(slot_mapping=slots, block_tables=None, context_lens=None, decode=False, has_prefix=False)
            self.fused.prefill(tok, pos, slots, last, meta, self.k_cache, self.v_cache)
        torch.cuda.synchronize(self.device)
        log.info("warm-up prefill of %d x %d tokens%s: %.0f ms", b, t, " (graph captured)" if key else "",
                 (time.perf_counter() - t0) * 1e3)

    def _refresh_fused(self) -> None:
        """Parameters were re-pointed (not copied into): rebuild the merged views and the graphs."""
        log.warning("model parameters were replaced (not updated in place); rebuilding the fused decode graphs")
        from forge.engine.fused import FusedDecode

        self.graphs.clear()
        self._prefill_graphs.clear()
        self.fused = FusedDecode(self.model, self.model.args.max_position_embeddings, fold_norms=self.fold_norms,
                                 group=self.tp.group if self.tp is not None else None)
        self.fused.reserve(self.config.max_num_seqs)
        self._key = None
        if self.device.type == "cuda" and self.config.enable_cuda_graphs:
            self._capture_fused()

    def _alloc_state(self, mb: int) -> None:
        dev = self.device
        self.state_rows = mb
        z = lambda dt: torch.zeros(mb, dtype=dt, device=dev)  # noqa: E731
        self.st_tok, self.st_pos = z(torch.int64), z(torch.int32)
        self.st_tables = torch.zeros(mb, self.max_blocks_per_seq, dtype=torch.int32, device=dev)
        self.st_temp = torch.ones(mb, dtype=torch.float32, device=dev)
        self.st_seed, self.st_stream, self.st_counter = z(torch.int64), z(torch.int64), z(torch.int64)
        self.st_out = torch.zeros(mb * 12, dtype=torch.uint8, device=dev)  # int64 tokens, then float32 logprobs
        self.st_out_tok = self.st_out[: mb * 8].view(torch.int64)
        self.st_out_lp = self.st_out[mb * 8:].view(torch.float32)
        self._host_out = [torch.zeros(mb * 12, dtype=torch.uint8, pin_memory=self.pin) for _ in range(2)]
        self._flip = 0
        self._key = None
        self._nblk: list[int] = []
        self._rows_sb = None

    def _fused_step(self, b: int) -> torch.Tensor:
        """Forward + sampling over the first b rows of the decode state (what a graph captures)."""
        logits = self.fused.forward(self.st_tok[:b], self.st_pos[:b], self.st_tables[:b], self.k_cache, self.v_cache)
        K.sample(logits, self.st_temp[:b], self.st_seed[:b], self.st_stream[:b], self.st_counter[:b],
                 any_greedy=True, out_tokens=self.st_out_tok[:b], out_logprobs=self.st_out_lp[:b])
        if self.tp is not None:  # rank 0's tokens are every rank's next inputs (captured in the graph)
            dist.broadcast(self.st_out_tok[:b], src=0, group=self.tp.group)
        return logits

    @torch.inference_mode()
    def _capture_fused(self) -> None:
        sizes = self.graph_sizes()
        pool = None
        self._key = None
        tuner = self._gemm_tuner()
        t0 = time.perf_counter()
        for b in sizes:  # largest first, so smaller graphs reuse its memory pool
            if tuner is not None and b >= self.config.tune_gemms_min_rows:
                try:
                    self.fused.tune_gemms(b, tuner)
                except Exception as e:  # noqa: BLE001 - a library problem must not cost the CUDA graphs
                    if self.config.tune_gemms:
                        raise
                    log.warning("cuBLASLt GEMM tuning failed (%s); the decode GEMMs stay F.linear", e)
                    tuner = self.fused.gemm_tuner = None
            self.st_pos[:b].zero_()
            self.st_tables[:b].zero_()  # scratch block 0
            self._fused_step(b)  # warm-up: kernel selection, triton compilation
            g = torch.cuda.CUDAGraph()
            # tensor parallel: NCCL's watchdog queries events while this thread captures the collectives
            with torch.cuda.graph(g, pool, capture_error_mode="thread_local" if self.tp is not None else "global"):
                out = self._fused_step(b)
            pool = pool or g.pool()
            self.graphs[b] = (g, out)
        torch.cuda.synchronize(self.device)
        log.info("captured fused decode CUDA graphs for batch sizes %s", sorted(self.graphs))
        if tuner is not None:
            t = tuner.summary()
            log.info("decode GEMMs: cuBLASLt algorithms for %d of %d shapes, %.0f -> %.0f us per step's calls "
                     "(tuning and capture %.1f s)", t["replaced"], t["shapes"], t["torch_us"], t["tuned_us"],
                     time.perf_counter() - t0)

    def _gemm_tuner(self):
        """The runner's cuBLASLt tuner (kept across fused-path rebuilds: its choices are per shape)."""
        want = self.config.tune_gemms
        if want is False or self.tp is not None:
            return None
        if self.gemm_tuner is None:
            from forge.engine.cublaslt import GemmTuner

            if not GemmTuner.supported(self.device, self.dtype):  # tune_gemms=True was checked at start
                return None
            self.gemm_tuner = GemmTuner(self.device, self.dtype)
        return self.gemm_tuner

    @torch.inference_mode()
    def _check_fused(self) -> float:
        """Layer 0 of the fused step against the model's eager layer 0 on the same cache contents:
        relative error of the layer's update to the residual stream (and a finite full step)."""
        dev, b, bs = self.device, min(4, self.state_rows), self.block_size
        g = torch.Generator(device="cpu").manual_seed(0)
        v = self.model.args.vocab_size
        tok = torch.randint(0, v, (b,), generator=g).to(dev)
        w = min(3, self.max_blocks_per_seq)
        pos = torch.tensor([min(p, w * bs - 1) for p in (0, 3, bs + 1, 2 * bs + 5)][:b], dtype=torch.int32, device=dev)
        if self.num_blocks < w * b + 1:
            return 0.0  # too small a cache to check without touching live blocks; the tests cover the math
        tables = torch.zeros(b, self.max_blocks_per_seq, dtype=torch.int32, device=dev)
        tables[:, :w] = torch.arange(1, 1 + b * w, dtype=torch.int32, device=dev).view(b, w)
        blocks = tables[:, :w].reshape(-1).long()
        kc, vc = self.k_cache[0], self.v_cache[0]
        kc[blocks] = torch.randn(kc[blocks].shape, generator=g).to(dev, self.dtype)
        vc[blocks] = torch.randn(vc[blocks].shape, generator=g).to(dev, self.dtype)
        emb = self.model.model.embed_tokens(tok)
        got = self.fused.forward(tok, pos, tables, self.k_cache, self.v_cache, num_layers=1, return_hidden=True)
        # eager: the model's own layer 0 with the torch attention
        slots = tables.long().gather(1, (pos.long() // bs)[:, None]).squeeze(1) * bs + pos.long() % bs
        self.meta = AttnMeta(slots, tables, pos + 1, decode=True)
        layer = self.model.model.layers[0]
        cos, sin = self.model.model.rotary_emb(pos.long().view(b, 1))
        x = emb.view(b, 1, -1)
        q, k, vv = _layer_pre(layer, x, cos, sin)
        ref = _layer_post(layer, x, self._attention(0, q, k, vv)).view(b, -1)  # torch attention (use_triton off)
        err = ((got - emb).float() - (ref - emb).float()).norm() / (ref - emb).float().norm().clamp_min(1e-12)
        full = self.fused.forward(tok, pos, tables, self.k_cache, self.v_cache)
        if not torch.isfinite(full.float()).all():
            return float("inf")
        return err.item()

    def _state_upload(self, seqs: list[Sequence], rows: list[tuple], gb: int) -> tuple[list, list, list]:
        """The whole decode state for this batch (padded to gb rows), as host lists for `_apply_upload`."""
        mbps = self.max_blocks_per_seq
        ints, temps, tables = [], [], []
        for s, r in zip(seqs, rows):
            ints += [s.token_ids[-1], s.num_computed, _seed63(r[4]), r[5], r[6]]
            temps.append(r[0])
            bt = s.block_table
            tables += bt + [0] * (mbps - len(bt))
        pad = gb - len(seqs)
        ints += [0, 0, 0, 0, 0] * pad
        temps += [1.0] * pad
        tables += [0] * (pad * mbps)
        return ints, temps, tables

    def _apply_upload(self, gb: int, ints: list[int], temps: list[float], tables: list[int]) -> None:
        mbps = self.max_blocks_per_seq
        i = self._tensor(ints, torch.int64).view(gb, 5)
        self.st_tok[:gb].copy_(i[:, 0])
        self.st_pos[:gb].copy_(i[:, 1])
        self.st_seed[:gb].copy_(i[:, 2])
        self.st_stream[:gb].copy_(i[:, 3])
        self.st_counter[:gb].copy_(i[:, 4])
        self.st_temp[:gb].copy_(self._tensor(temps, torch.float32))
        self.st_tables[:gb].copy_(self._tensor(tables, torch.int32).view(gb, mbps))

    def compact_ok(self, sampler) -> bool:
        """May the next decode step gather its state from the in-flight one (`decode_launch(keep=)`)?
        Only where the in-flight batch was sampled in the graph (no per-row torch sampling state)."""
        sb = self._rows_sb
        return self.fused is not None and self._key is not None and sb is not None and sb.fast_ok and sampler.fast

    def _compact(self, keep: list[int], b: int, gb: int) -> None:
        """The next step's state from the in-flight step's, rows `keep` only, gathered on the device:
        the in-flight step's sampled tokens become the inputs, positions and counters move on by one
        (as `advance`). Rows b..gb-1 become padding (position 0 in the scratch block 0)."""
        idx = self._tensor(keep, torch.int64)
        moved = [(self.st_tok, self.st_out_tok.index_select(0, idx)),
                 (self.st_pos, self.st_pos.index_select(0, idx) + 1),
                 (self.st_counter, self.st_counter.index_select(0, idx) + 1),
                 (self.st_seed, self.st_seed.index_select(0, idx)),
                 (self.st_stream, self.st_stream.index_select(0, idx)),
                 (self.st_temp, self.st_temp.index_select(0, idx)),
                 (self.st_tables, self.st_tables.index_select(0, idx))]
        for dst, src in moved:  # gathered into new tensors first: rows move up, so in place would race
            dst[:b].copy_(src)
        if gb > b:
            for t in (self.st_tok, self.st_pos, self.st_seed, self.st_stream, self.st_counter, self.st_tables):
                t[b:gb].zero_()
            self.st_temp[b:gb].fill_(1.0)

    def _table_update(self, seqs: list[Sequence], nblk: list[int]) -> tuple[list[int], list[int]]:
        """The block-table entries that changed since the last step, as (flat index, block) lists."""
        idx, val = [], []
        mbps = self.max_blocks_per_seq
        for i, (s, old, new) in enumerate(zip(seqs, self._nblk, nblk)):
            if new != old:
                for j in range(old, new):
                    idx.append(i * mbps + j)
                    val.append(s.block_table[j])
        return idx, val

    def _apply_ops(self, ops: list[tuple], first_tok: torch.Tensor | None) -> None:
        """Move the device decode state as `decode_launch` planned (a tensor-parallel follower replays
        rank 0's plan here). `first_tok`: rank 0's unread first tokens of prefilled rows (followers
        receive them by broadcast)."""
        for op in ops:
            kind = op[0]
            if kind == "compact":
                self._compact(*op[1:])
            elif kind == "upload":
                self._apply_upload(*op[1:])
            elif kind == "first_tokens":
                idx = op[1]
                if self.tp is not None:
                    first_tok = (torch.empty(len(idx), dtype=torch.int64, device=self.device) if first_tok is None
                                 else first_tok.to(torch.int64).contiguous())
                    dist.broadcast(first_tok, src=0, group=self.tp.group)
                self.st_tok.index_copy_(0, self._tensor(idx, torch.int64), first_tok.to(self.st_tok.dtype))
            elif kind == "advance":
                K.advance(self.st_tok, self.st_pos, self.st_counter, self.st_out_tok, op[1])
            elif kind == "tables":
                self.st_tables.view(-1).index_copy_(0, self._tensor(op[1], torch.int64),
                                                    self._tensor(op[2], torch.int32))
            else:
                raise RuntimeError(f"fused decode: unknown state op {kind!r}")

    def _fused_run(self, gb: int) -> torch.Tensor:
        if gb in self.graphs:
            graph, logits = self.graphs[gb]
            graph.replay()
            return logits
        return self._fused_step(gb)

    @torch.inference_mode()
    def run_fused_decode(self, ops: list[tuple], b: int, gb: int, torch_sample: bool) -> None:
        """A tensor-parallel follower's copy of rank 0's `decode_launch`: the same state moves, forward and
        sampling; the tokens are rank 0's (broadcast), so every rank's decode state stays the same."""
        self._apply_ops(ops, None)
        self._fused_run(gb)
        if torch_sample:
            dist.broadcast(self.st_out_tok[:b], src=0, group=self.tp.group)

    @torch.inference_mode()
    def decode_launch(self, seqs: list[Sequence], rows_fn, sampler, keep: list[int] | None = None,
                      first_tokens: tuple[list[int], torch.Tensor] | None = None) -> DecodeHandle:
        """Queue one fused decode step (forward + sampling) for `seqs`; nothing waits for the device.

        rows_fn() -> the sampling rows of `seqs` (`LLMEngine._sampling_row`), called only when the
        batch differs from the last step's (else the state on the device moves on by itself).
        `keep`: `seqs` are these rows of the step in flight, in order (a batch that only lost rows):
        their state is gathered on the device from the in-flight step's, whose tokens the host
        has not read yet. `first_tokens` (rows, tokens on the device): these rows' input tokens are the
        first tokens a prefill step sampled, which the host has not read yet (their `token_ids` end with
        the prompt)."""
        self.fused.refresh_folds()  # parameters updated in place since the last step: re-fold first
        b = len(seqs)
        gb = next((x for x in sorted(self.graphs) if x >= b), b)
        key = tuple(s.seq_id for s in seqs)
        nblk = [len(s.block_table) for s in seqs]
        ops: list[tuple] = []  # the device state's moves, planned here (host state only), applied below
        if key != self._key and keep is not None and self._key is not None and len(keep) == b:
            rows = rows_fn()
            ops.append(("compact", keep, b, gb))
            self._rows_sb = SamplingBatch.build(rows, self.device, state=(
                self.st_temp[:b], self.st_seed[:b], self.st_stream[:b], self.st_counter[:b]))
            self._key, self._gb = key, gb
            self._nblk = [self._nblk[i] for i in keep]
            if nblk != self._nblk:
                ops.append(("tables", *self._table_update(seqs, nblk)))
        elif key != self._key:
            rows = rows_fn()
            self._key = None
            ops.append(("upload", gb, *self._state_upload(seqs, rows, gb)))
            if first_tokens is not None:
                ops.append(("first_tokens", list(first_tokens[0])))
            self._rows_sb = SamplingBatch.build(rows, self.device, state=(
                self.st_temp[:b], self.st_seed[:b], self.st_stream[:b], self.st_counter[:b]))
            self._key, self._gb = key, gb
        else:
            gb = self._gb
            ops.append(("advance", gb))
            if nblk != self._nblk:
                ops.append(("tables", *self._table_update(seqs, nblk)))
        self._nblk = nblk
        sb = self._rows_sb
        torch_sample = not sb.fast_ok or not sampler.fast
        if self.tp is not None:
            self.tp.send_plan(("fused_decode", ops, b, gb, torch_sample))
        self._apply_ops(ops, first_tokens[1] if first_tokens is not None else None)
        logits = self._fused_run(gb)
        if torch_sample:
            tok, lp = sampler(logits[:b], sb)
            self.st_out_tok[:b].copy_(tok)
            self.st_out_lp[:b].copy_(lp)
            if self.tp is not None:
                dist.broadcast(self.st_out_tok[:b], src=0, group=self.tp.group)
        host = self._host_out[self._flip]
        self._flip ^= 1
        host.copy_(self.st_out, non_blocking=self.pin)
        ev = None
        if self.device.type == "cuda":
            ev = torch.cuda.Event()
            ev.record()
        return DecodeHandle(host, b, self.state_rows, ev, chainable=True)
