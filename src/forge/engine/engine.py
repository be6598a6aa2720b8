"""`LLMEngine`: continuous-batching generation over token ids.

    engine = LLMEngine(model, EngineConfig(max_num_seqs=64), eos_token_ids=[2])
    outs = engine.generate([(prompt_ids, SamplingParams(temperature=1.0, n=4))])

`add_request` queues, `step` runs one forward pass (a prefill or a decode, see
`forge.engine.scheduler`) and returns the requests that finished in it. Not thread-safe: one
thread drives it (the `Generator` actor runs it in a worker thread).

Overlap (fused decode, `EngineConfig.overlap_decode`): when the next decode step would run the
same batch as the one in flight (nothing waiting, nobody finished, blocks available), `step`
queues it on the device *before* reading the in-flight step's tokens, so the host's work per
token (appending, stop checks, scheduling) runs while the GPU computes. The device feeds the
sampled tokens to the next step itself. A row whose sequence turns out to have stopped is
computed once more and dropped; its k/v write lands in blocks it still holds. When the next
batch is the in-flight one minus rows that stopped, it is queued the same way, its state gathered
on the device from the in-flight step's (`ModelRunner.decode_launch(keep=)`). The decode step
after a prefill (new rows joining, or the first decode) is queued before the prefill's first
tokens are read: they are copied into the decode state on the device
(`decode_launch(first_tokens=)`, `stats["decodes_joining_prefill"]`). Everything else (preemption,
a full cache, a prefilled row whose first token is its last) first drains the step in flight,
so outputs are the same as without overlap.

Prefill overlap (`EngineConfig.overlap_prefill`): while prompts are waiting, the in-flight step's
tokens are read only after their prefill is queued (a prefill needs no sampled token): after a
prefill step, the next prompts' chunk; after a decode step, the prompts that arrived while it
ran. The host's work for a prefill chunk (scheduling, building its inputs) then runs while the
device computes the previous step. Tokens are the same (sampling is per request, seeded); a
request that finishes with its first token is returned one step later.

Length rules: generation stops at `max_tokens` or when prompt + generated reaches
`max_model_len` (stop_reason "length"). A prompt that leaves no room for one new token
follows `EngineConfig.long_prompt`: "reject" -> finished at once with no tokens and
stop_reason "prompt_too_long"; "truncate" -> its oldest tokens are dropped, and the output's
`prompt_ids` are the kept ones (metadata `prompt_truncated: True`, `truncated_prompt_tokens`).
"""

from __future__ import annotations

import itertools
import numbers
import time
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Sequence as Seq
from typing import Any

import torch

from forge.engine.block_manager import BlockManager
from forge.engine.config import EngineConfig, SamplingParams
from forge.engine.runner import ModelRunner
from forge.engine.sampler import Sampler, SamplingBatch
from forge.engine.scheduler import Scheduler
from forge.engine.sequence import Request, RequestOutput, SampleOutput, SeqStatus, Sequence
from forge.engine.tp import TPGroup, check_tp_degree, load_shards, shard_model
from forge.models.decoder import CausalLM


class LLMEngine:
    # a decode batch that only lost rows goes on from the in-flight step's device state (see `_shrunk`);
    # off: it drains first, as before (kept for A/B measurement: bench/generate_throughput.py)
    compact_in_flight = True
    # the decode after a prefill is queued before the prefill's first tokens are read (`_decode_joining`);
    # off: it drains first, as before (A/B measurement)
    join_prefilled = True

    def __init__(self, model: CausalLM, config: EngineConfig | dict | None = None,
                 eos_token_ids: Seq[int] | None = None, tokenizer: Any = None):
        self.config = c = EngineConfig.from_dict(config)
        device = torch.device(c.device) if c.device is not None else next(model.parameters()).device
        dtype = c.dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.args = model.args
        # RoPE tables (and the model's training length) bound the usable context
        self.max_model_len = min(c.max_model_len, model.args.max_position_embeddings)
        self.tp: TPGroup | None = None  # tensor parallel (forge.engine.tp): this rank's place in the replica
        if c.tensor_parallel_size > 1:
            check_tp_degree(model.args, c.tensor_parallel_size)
            self.tp = TPGroup.join(c.tensor_parallel_size, device)
            shard_model(model, self.tp)
        self.runner = ModelRunner(model, c, device, dtype, self.max_model_len, self.tp)
        self.model = self.runner.model
        self.device = device
        self.blocks = BlockManager(self.runner.num_blocks, c.block_size)
        self.scheduler = Scheduler(c, self.blocks)
        self.sampler = Sampler(device, c.seed, fast=c.fast_sampler)
        self.eos_token_ids = set(model.args.eos_token_ids if eos_token_ids is None else eos_token_ids)
        self.tokenizer = tokenizer
        self.requests: dict[int, Request] = {}
        self._ids = itertools.count()
        self._done_early: list[RequestOutput] = []
        self._last_sb: tuple | None = None
        self._pending = None  # a launched decode step whose tokens are not read yet (overlap)
        self._dirty = False  # a sequence of the in-flight batch stopped since its launch
        self.stats = {"prefill_tokens": 0, "decode_tokens": 0, "steps": 0, "forward_s": 0.0, "overlapped_steps": 0,
                      "prefills_ahead_of_decode": 0, "decodes_joining_prefill": 0}

    # ---- requests -------------------------------------------------------------------------
    def prompt_token_ids(self, prompt_ids: Seq[int] | torch.Tensor) -> list[int]:
        """The prompt as a list of ints, checked: non-empty, integers (int() would silently turn 1.7 into
        token 1), each in [0, vocab_size). A ValueError names what is wrong."""
        ids = prompt_ids.tolist() if isinstance(prompt_ids, torch.Tensor) else list(prompt_ids)
        bad = next((x for x in ids if isinstance(x, bool) or not isinstance(x, numbers.Integral)), None)
        if bad is not None:
            raise ValueError(f"add_request: prompt token ids must be integers; got {bad!r} ({type(bad).__name__})")
        ids = [int(x) for x in ids]
        if not ids:
            raise ValueError("add_request: empty prompt (need at least one token id)")
        v = self.args.vocab_size
        if min(ids) < 0 or max(ids) >= v:
            raise ValueError(f"add_request: prompt token ids must be in [0, {v}); got min {min(ids)}, max {max(ids)}")
        return ids

    def add_request(self, prompt_ids: Seq[int] | torch.Tensor, params: SamplingParams | dict | None = None,
                    metadata: dict[str, Any] | None = None) -> int:
        params = SamplingParams.from_dict(params)
        ids = self.prompt_token_ids(prompt_ids)
        if params.n > self.config.max_num_seqs:
            raise ValueError(f"add_request: n={params.n} exceeds max_num_seqs={self.config.max_num_seqs}")
        if params.stop and self.tokenizer is None:
            raise ValueError("add_request: stop strings need a tokenizer (LLMEngine(..., tokenizer=...))")
        rid = next(self._ids)
        req = Request(rid, ids, params, max_new_tokens=0, metadata=dict(metadata or {}),
                      seed=params.seed if params.seed is not None else _derived_seed(self.config.seed, rid))
        limit = self.max_model_len
        if len(ids) >= limit:
            if self.config.long_prompt == "reject":
                req.metadata["prompt_too_long"] = len(ids)
                outs = [SampleOutput(i, [], [], "prompt_too_long", "" if self.tokenizer else None) for i in range(params.n)]
                self._done_early.append(RequestOutput(rid, ids, outs, dict(req.metadata)))
                return rid
            keep = limit - params.max_tokens if params.max_tokens < limit else limit // 2
            req.metadata["truncated_prompt_tokens"] = len(ids) - keep
            req.metadata["prompt_truncated"] = True
            ids = ids[len(ids) - keep :]
            # the output carries what was generated from: a trainer scoring the full prompt would
            # condition on a context the sampler never saw (and run past max_model_len)
            req.prompt_ids = ids
        req.max_new_tokens = min(params.max_tokens, limit - len(ids))
        need = self.blocks.blocks_for(len(ids)) + params.n - 1
        if need > self.blocks.capacity_blocks:
            raise ValueError(f"add_request: the prompt ({len(ids)} tokens) with n={params.n} needs {need} KV blocks; "
                             f"the cache has {self.blocks.capacity_blocks} ({self.config.block_size} tokens each)")
        seq = Sequence(req, 0, list(ids), len(ids), fork_n=params.n)
        req.seqs.append(seq)
        self.requests[rid] = req
        self.scheduler.add(seq)
        return rid

    def has_unfinished(self) -> bool:
        return bool(self.requests or self._done_early)

    # ---- the loop ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One forward pass; returns the requests that finished in it."""
        if self.tp is not None and not self.tp.leader:
            raise RuntimeError(f"tensor-parallel rank {self.tp.rank} follows rank 0: run follow(), not step()")
        done, self._done_early = self._done_early, []
        t0 = time.perf_counter()
        pend, self._pending = self._pending, None
        if pend is not None:
            queued, self._pending = self._launch_ahead(pend)
            self._consume(pend, done)
            if queued:
                self.stats["overlapped_steps"] += 1
                self.stats["forward_s"] += time.perf_counter() - t0
                return done
        batch = self.scheduler.schedule()
        if batch is None:
            return done
        if batch.prefill:
            h = self._launch_prefill(batch.prefill)
            if h is not None and self.config.overlap_prefill and (self.scheduler.waiting or self._may_join(h)):
                # read at the next step, after queueing the next prompts' prefill or the decode they join
                self._pending = h
            elif h is not None:
                self._consume(h, done)
        else:
            seqs = batch.decode
            left = max(s.request.max_new_tokens - s.num_generated for s in seqs)
            h = self._launch_decode(seqs, left)
            if self.config.overlap_decode and h.chainable:
                self._pending = h
            else:
                self._consume(h, done)
        self.stats["forward_s"] += time.perf_counter() - t0
        return done

    def _launch_prefill(self, chunks: list) -> _PrefillHandle | None:
        """Queue the prefill of these prompt chunks and the sampling of each completed prompt's first
        token (nothing waits for the device); None when no prompt completes in this step."""
        logits = self.runner.prefill(chunks)
        rows, seqs = [], []
        for i, ch in enumerate(chunks):
            ch.seq.num_computed = ch.end
            self.stats["prefill_tokens"] += ch.end - ch.start
            if ch.end < len(ch.seq):
                continue  # chunked prefill goes on next step
            self.scheduler.finish_prefill(ch.seq)
            group = self._fork(ch.seq)
            rows += [i] * len(group)
            seqs += group
        self.stats["steps"] += 1
        if not seqs:
            return None
        if rows != list(range(len(chunks))):
            logits = logits[self.runner._tensor(rows, torch.int64)]
        sb = SamplingBatch.build([self._sampling_row(s) for s in seqs], self.device)
        self._last_sb = None
        tokens, logprobs = self.sampler(logits, sb)
        return _PrefillHandle(seqs, tokens, logprobs, self.runner.pin)

    def _launch_decode(self, seqs: list[Sequence], left: int, keep: list[int] | None = None,
                       rows: list[tuple] | None = None, first_tokens: tuple | None = None):
        """Queue one decode step of `seqs`; returns a handle whose `result()` gives tokens and logprobs.
        `left`: the most tokens any of them still has to generate, this step's included. `keep`:
        `seqs` are these rows of the step in flight; `rows` / `first_tokens`: their sampling rows and
        the prefilled rows' unread first tokens (see `ModelRunner.decode_launch`)."""
        r = self.runner
        if r.fused is not None:
            h = r.decode_launch(seqs, (lambda: rows) if rows is not None else
                                (lambda: [self._sampling_row(s) for s in seqs]), self.sampler, keep, first_tokens)
        else:
            logits = r.decode(seqs)
            key = tuple(s.seq_id for s in seqs)
            if self._last_sb is not None and self._last_sb[0] == key:
                sb = self._last_sb[1]  # same decode batch as last step: only the token counters moved
                sb.counter += 1
            else:
                sb = SamplingBatch.build([self._sampling_row(s) for s in seqs], self.device)
            self._last_sb = (key, sb)
            h = _Ready(*self.sampler(logits, sb))
        h.seqs, h.left = seqs, left
        for s in seqs:
            s.num_computed += 1
        self.stats["decode_tokens"] += len(seqs)
        self.stats["steps"] += 1
        self._dirty = False
        return h

    def _launch_ahead(self, pend) -> tuple[bool, Any]:
        """Queue the next step before the in-flight one's tokens are read, where it needs none of
        them: the next prompts' prefill after a prefill; after a decode, the same batch again
        (`_chainable`), the batch minus rows that stopped (`_shrunk`), or the prefill of prompts
        that arrived meanwhile. (queued?, its handle)."""
        if isinstance(pend, _PrefillHandle):
            chunks = self.scheduler.schedule_prefill()
            if chunks:
                return True, self._launch_prefill(chunks)
            h = self._decode_joining(pend)
            return (True, h) if h is not None else (False, None)
        if self._chainable(pend):
            return True, self._launch_decode(pend.seqs, pend.left - 1)
        keep = self._shrunk(pend)
        if keep is not None:
            seqs = list(self.scheduler.running)
            left = max(s.request.max_new_tokens - s.num_generated for s in seqs) - 1  # pend's token is in flight
            return True, self._launch_decode(seqs, left, keep)
        if self.config.overlap_prefill and self.scheduler.waiting:
            # new prompts while a decode step is in flight: their prefill needs none of its tokens
            chunks = self.scheduler.schedule_prefill()
            if chunks:
                self.stats["prefills_ahead_of_decode"] += 1
                return True, self._launch_prefill(chunks)
        return False, None

    def _may_join(self, h: _PrefillHandle) -> bool:
        """Can the decode step after this prefill be queued before its first tokens are read (fused path)?"""
        return (self.join_prefilled and self.config.overlap_decode and self.runner.fused is not None
                and all(s.request.max_new_tokens - s.num_generated > 1 for s in h.seqs))  # not its last token

    def _decode_joining(self, pend: _PrefillHandle):
        """After a prefill step whose first tokens are not read yet, with no prompt left to prefill:
        queue the decode of every running sequence now, the prefilled rows' inputs being those first
        tokens, copied on the device (`decode_launch(first_tokens=)`), so that the device does not
        idle while the host reads them. None where that does not apply (the caller drains first)."""
        if self.scheduler.waiting or not self._may_join(pend):
            return None
        seqs = list(self.scheduler.running)
        new = {id(s): i for i, s in enumerate(pend.seqs)}
        if not seqs or sum(id(s) in new for s in seqs) != len(pend.seqs):
            return None
        if not self._blocks_for_next_token(seqs):
            return None  # the cache is full: drain, then the scheduler preempts
        # a prefilled row's first token (counter 0) is the one in flight: this step samples its second
        rows = [self._sampling_row(s, ahead=int(id(s) in new)) for s in seqs]
        idx = [i for i, s in enumerate(seqs) if id(s) in new]
        src = self.runner._tensor([new[id(seqs[i])] for i in idx], torch.int64)
        left = max(s.request.max_new_tokens - s.num_generated - (id(s) in new) for s in seqs)
        h = self._launch_decode(seqs, left, rows=rows, first_tokens=(idx, pend.device_tokens.index_select(0, src)))
        self.stats["decodes_joining_prefill"] += 1
        return h

    def _blocks_for_next_token(self, seqs: list[Sequence]) -> bool:
        """Make sure each sequence has the block its next k/v write (position num_computed) lands in;
        False when the cache is full (the scheduler then preempts, after draining)."""
        ensure = self.blocks.ensure
        return all(ensure(s, s.num_computed + 1) for s in seqs)

    def _chainable(self, pend) -> bool:
        """May the next step reuse the in-flight batch as it stands (see the module docstring)?"""
        if not (self.config.overlap_decode and pend.chainable) or self._dirty or self.scheduler.waiting:
            return False
        seqs = pend.seqs
        if pend.left <= 1 or len(seqs) != len(self.scheduler.running):
            return False  # every row's last token is in flight, or the running set moved
        return self._blocks_for_next_token(seqs)

    def _shrunk(self, pend) -> list[int] | None:
        """When the next decode batch is the in-flight one minus rows that stopped (nothing waiting,
        blocks available, the fast sampler), the in-flight rows it keeps, in order; else None."""
        if (not (self.config.overlap_decode and pend.chainable and self._dirty and self.compact_in_flight)
                or self.scheduler.waiting):
            return None
        running = self.scheduler.running
        if not running or len(running) >= len(pend.seqs) or not self.runner.compact_ok(self.sampler):
            return None
        where = {id(s): i for i, s in enumerate(pend.seqs)}
        keep = [where.get(id(s), -1) for s in running]
        if min(keep) < 0 or keep != sorted(keep):
            return None  # a sequence that was not in flight, or a new order
        if max(s.request.max_new_tokens - s.num_generated for s in running) <= 1:
            return None  # every row's last token is in flight
        return keep if self._blocks_for_next_token(running) else None

    def _consume(self, h, done: list[RequestOutput]) -> None:
        tokens, logprobs = h.result()
        self._append(h.seqs, tokens, logprobs, done)

    def _append(self, seqs: list[Sequence], tokens: list[int], logprobs: list[float], done: list[RequestOutput]) -> None:
        running = SeqStatus.RUNNING
        for s, tok, lp in zip(seqs, tokens, logprobs):
            if s.status is not running:
                continue  # stopped while this (overlapped) step was in flight: its row is dropped
            s.token_ids.append(tok)
            s.logprobs.append(lp)
            reason = self._stop_reason(s, tok)
            if reason is not None:
                s.stop_reason = reason
                self.scheduler.finish(s)
                self._dirty = True
                req = s.request
                req.num_finished += 1
                if req.finished:
                    done.append(self._finalize(req))

    # ---- tensor parallelism (forge.engine.tp) --------------------------------------------------
    def follow(self, on_update: Callable[[int], Any] | None = None) -> None:
        """Ranks other than 0 of a tensor-parallel replica: run rank 0's forwards on this rank's shard
        until rank 0 calls `shutdown`. Rank 0's `load_weights(..., version)` calls `on_update(version)`
        here between two forwards; it must load this rank's weights of that version (`load_weights`)."""
        tp = self.tp
        if tp is None or tp.leader:
            raise RuntimeError("follow() is for tensor-parallel ranks other than 0")
        r = self.runner
        while True:
            op, *args = tp.recv_plan()
            if op == "prefill":
                r.run_prefill(*args)
            elif op == "prefill_graph":
                with torch.inference_mode():
                    r._prefill_replay(*args)
            elif op == "decode":
                r.run_decode(*args)
            elif op == "fused_decode":
                r.run_fused_decode(*args)
            elif op == "copy_blocks":
                r.copy_blocks(*args)
            elif op == "update":
                if on_update is None:
                    raise RuntimeError(f"rank 0 loaded weights version {args[0]}; this follower has no on_update")
                on_update(args[0])
            elif op == "stop":
                return
            else:
                raise RuntimeError(f"tensor-parallel follower: unknown plan {op!r}")

    def shutdown(self) -> None:
        """Rank 0 of a tensor-parallel replica: release the followers from `follow` (idempotent)."""
        if self.tp is not None and self.tp.leader and not getattr(self, "_shut", False):
            self._shut = True
            self.tp.send_plan(("stop",))

    def load_weights(self, state_dict: Mapping[str, torch.Tensor] | Iterable, version: int = 0) -> int:
        """Copy full-size weights (HF names) into the model in place; under tensor parallelism each
        rank copies only its shard, and rank 0 first has every follower load `version` (`follow`)."""
        if self.tp is not None and self.tp.leader:
            self.tp.send_plan(("update", int(version)))
        return load_shards(self.model, state_dict, self.tp)

    def drop_in_flight(self) -> None:
        """Forget an overlapped decode step that was launched but not read (after a failure, when the
        caller clears the scheduler itself); the next decode rebuilds the device-side batch state."""
        self._pending = None
        self._last_sb = None
        if self.runner.fused is not None:
            self.runner._key = None

    def generate(self, requests: Seq[tuple[Seq[int] | torch.Tensor, SamplingParams | dict | None]]) -> list[RequestOutput]:
        """Run until these requests finish; outputs in input order (others in flight keep going)."""
        ids = [self.add_request(p, sp) for p, sp in requests]
        want, got = set(ids), {}
        while want - got.keys():
            for out in self.step():
                got[out.request_id] = out
            if not self.scheduler.has_work() and not self._done_early and want - got.keys():
                raise RuntimeError("engine idle with unfinished requests (bug)")
        return [got[i] for i in ids]

    # ---- helpers ----------------------------------------------------------------------------
    def _fork(self, parent: Sequence) -> list[Sequence]:
        """After a prompt's single prefill: parent + n-1 siblings sharing its KV blocks."""
        group = [parent]
        copies = []
        for i in range(1, parent.fork_n):
            child = Sequence(parent.request, i, list(parent.token_ids), parent.num_prompt_tokens)
            pair = self.blocks.fork(parent, child)
            if pair:
                copies.append(pair)
            child.status = SeqStatus.RUNNING
            self.scheduler.running.append(child)
            parent.request.seqs.append(child)
            group.append(child)
        parent.fork_n = 1
        self.runner.copy_blocks(copies)
        return group

    @staticmethod
    def _sampling_row(s: Sequence, ahead: int = 0) -> tuple:
        """`ahead`: tokens of `s` sampled on the device but not read yet (the seeded stream's counter)."""
        p = s.params
        return (p.temperature, p.top_k, p.top_p, p.min_p, s.request.seed, s.index, s.num_generated + ahead,
                p.truncated_logprobs and p.temperature > 0)

    def _stop_reason(self, s: Sequence, tok: int) -> str | None:
        p = s.params
        if (tok in self.eos_token_ids and not p.ignore_eos) or tok in p.stop_token_ids:
            return "stop"
        if p.stop and self._hits_stop_string(s):
            return "stop"
        if s.num_generated >= s.request.max_new_tokens:
            return "length"
        return None

    def _hits_stop_string(self, s: Sequence) -> bool:
        window = max(len(x) for x in s.params.stop) + 8  # tokens: every stop string fits in its chars' tokens
        tail = self.tokenizer.decode(s.generated[-window:], skip_special_tokens=True)
        return any(x in tail for x in s.params.stop)

    def _finalize(self, req: Request) -> RequestOutput:
        del self.requests[req.request_id]
        if self.tokenizer is not None:
            for s in req.seqs:
                text = self.tokenizer.decode(s.generated, skip_special_tokens=True)
                cut = [text.find(x) for x in req.params.stop if x in text]
                s.text = text[: min(cut)] if cut else text
        return req.output()


class _PrefillHandle:
    """The first tokens of the prompts one prefill step completed, copied to the host in the
    background; `result()` waits for them."""

    chainable = False

    def __init__(self, seqs: list[Sequence], tokens: torch.Tensor, logprobs: torch.Tensor, pin: bool):
        self.seqs, self.event = seqs, None
        self.device_tokens = tokens  # a decode step may take them as inputs before they are read
        if tokens.is_cuda:
            self.tokens = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=pin)
            self.logprobs = torch.empty(logprobs.shape, dtype=logprobs.dtype, pin_memory=pin)
            self.tokens.copy_(tokens, non_blocking=pin)
            self.logprobs.copy_(logprobs, non_blocking=pin)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.tokens, self.logprobs = tokens, logprobs

    def result(self) -> tuple[list[int], list[float]]:
        if self.event is not None:
            self.event.synchronize()
        return self.tokens.tolist(), self.logprobs.tolist()


class _Ready:
    """Tokens / logprobs already computed (device tensors), read on `result()`."""

    chainable = False

    def __init__(self, tokens: torch.Tensor, logprobs: torch.Tensor):
        self.tokens, self.logprobs = tokens, logprobs

    def result(self) -> tuple[list[int], list[float]]:
        return self.tokens.tolist(), self.logprobs.tolist()


def _derived_seed(engine_seed: int, request_id: int) -> int:
    """A request's sampling seed when it has none: splitmix64 of (engine seed, request number)."""
    m = (1 << 64) - 1
    z = (int(engine_seed) * 0x9E3779B97F4A7C15 + (int(request_id) + 1) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return (z ^ (z >> 31)) & ((1 << 63) - 1)
