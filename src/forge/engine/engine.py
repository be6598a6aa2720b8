"""`LLMEngine`: continuous-batching generation over token ids.

    engine = LLMEngine(model, EngineConfig(max_num_seqs=64), eos_token_ids=[2])
    outs = engine.generate([(prompt_ids, SamplingParams(temperature=1.0, n=4))])

`add_request` queues, `step` runs one forward pass (a prefill or a decode, see
`forge.engine.scheduler`) and returns the requests that finished in it. Not thread-safe: one
thread drives it (the `Generator` actor runs it in a worker thread).

Length rules: generation stops at `max_tokens` or when prompt + generated reaches
`max_model_len` (stop_reason "length"). A prompt that leaves no room for one new token
follows `EngineConfig.long_prompt`: "reject" -> finished at once with no tokens and
stop_reason "prompt_too_long"; "truncate" -> its oldest tokens are dropped.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence as Seq
from typing import Any

import torch

from forge.engine.block_manager import BlockManager
from forge.engine.config import EngineConfig, SamplingParams
from forge.engine.runner import ModelRunner
from forge.engine.sampler import Sampler, SamplingBatch
from forge.engine.scheduler import Scheduler
from forge.engine.sequence import Request, RequestOutput, SampleOutput, Sequence, SeqStatus
from forge.models.decoder import CausalLM


class LLMEngine:
    def __init__(self, model: CausalLM, config: EngineConfig | dict | None = None,
                 eos_token_ids: Seq[int] | None = None, tokenizer: Any = None):
        self.config = c = EngineConfig.from_dict(config)
        device = torch.device(c.device) if c.device is not None else next(model.parameters()).device
        dtype = c.dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.args = model.args
        # RoPE tables (and the model's training length) bound the usable context
        self.max_model_len = min(c.max_model_len, model.args.max_position_embeddings)
        self.runner = ModelRunner(model, c, device, dtype, self.max_model_len)
        self.model = self.runner.model
        self.device = device
        self.blocks = BlockManager(self.runner.num_blocks, c.block_size)
        self.scheduler = Scheduler(c, self.blocks)
        self.sampler = Sampler(device, c.seed)
        self.eos_token_ids = set(model.args.eos_token_ids if eos_token_ids is None else eos_token_ids)
        self.tokenizer = tokenizer
        self.requests: dict[int, Request] = {}
        self._ids = itertools.count()
        self._done_early: list[RequestOutput] = []
        self._last_sb: tuple | None = None
        self.stats = {"prefill_tokens": 0, "decode_tokens": 0, "steps": 0, "forward_s": 0.0}

    # ---- requests -------------------------------------------------------------------------
    def add_request(self, prompt_ids: Seq[int] | torch.Tensor, params: SamplingParams | dict | None = None,
                    metadata: dict[str, Any] | None = None) -> int:
        params = SamplingParams.from_dict(params)
        ids = prompt_ids.tolist() if isinstance(prompt_ids, torch.Tensor) else [int(x) for x in prompt_ids]
        if not ids:
            raise ValueError("add_request: empty prompt (need at least one token id)")
        v = self.args.vocab_size
        if min(ids) < 0 or max(ids) >= v:
            raise ValueError(f"add_request: prompt token ids must be in [0, {v}); got min {min(ids)}, max {max(ids)}")
        if params.n > self.config.max_num_seqs:
            raise ValueError(f"add_request: n={params.n} exceeds max_num_seqs={self.config.max_num_seqs}")
        if params.stop and self.tokenizer is None:
            raise ValueError("add_request: stop strings need a tokenizer (LLMEngine(..., tokenizer=...))")
        rid = next(self._ids)
        req = Request(rid, ids, params, max_new_tokens=0, metadata=dict(metadata or {}))
        limit = self.max_model_len
        if len(ids) >= limit:
            if self.config.long_prompt == "reject":
                req.metadata["prompt_too_long"] = len(ids)
                outs = [SampleOutput(i, [], [], "prompt_too_long", "" if self.tokenizer else None) for i in range(params.n)]
                self._done_early.append(RequestOutput(rid, ids, outs, dict(req.metadata)))
                return rid
            keep = limit - params.max_tokens if params.max_tokens < limit else limit // 2
            req.metadata["truncated_prompt_tokens"] = len(ids) - keep
            ids = ids[len(ids) - keep :]
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
        done, self._done_early = self._done_early, []
        batch = self.scheduler.schedule()
        if batch is None:
            return done
        t0 = time.perf_counter()
        if batch.prefill:
            logits = self.runner.prefill(batch.prefill)
            rows, seqs = [], []
            for i, ch in enumerate(batch.prefill):
                ch.seq.num_computed = ch.end
                self.stats["prefill_tokens"] += ch.end - ch.start
                if ch.end < len(ch.seq):
                    continue  # chunked prefill goes on next step
                self.scheduler.finish_prefill(ch.seq)
                group = self._fork(ch.seq)
                rows += [i] * len(group)
                seqs += group
            if not seqs:
                self.stats["forward_s"] += time.perf_counter() - t0
                return done
            logits = logits[torch.tensor(rows, device=logits.device)]
        else:
            seqs = batch.decode
            logits = self.runner.decode(seqs)
            for s in seqs:
                s.num_computed += 1
            self.stats["decode_tokens"] += len(seqs)
        key = tuple(s.seq_id for s in seqs) if batch.decode else None
        if key is not None and self._last_sb is not None and self._last_sb[0] == key:
            sb = self._last_sb[1]  # same decode batch as last step: only the token counters moved
            sb.counter += 1
        else:
            sb = SamplingBatch.build([self._sampling_row(s) for s in seqs], self.device)
        self._last_sb = (key, sb)
        tokens, logprobs = self.sampler(logits, sb)
        tokens, logprobs = tokens.tolist(), logprobs.tolist()
        self.stats["forward_s"] += time.perf_counter() - t0
        self.stats["steps"] += 1
        for s, tok, lp in zip(seqs, tokens, logprobs):
            s.token_ids.append(tok)
            s.logprobs.append(lp)
            reason = self._stop_reason(s, tok)
            if reason is not None:
                s.stop_reason = reason
                self.scheduler.finish(s)
                req = s.request
                req.num_finished += 1
                if req.finished:
                    done.append(self._finalize(req))
        return done

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
    def _sampling_row(s: Sequence) -> tuple:
        p = s.params
        return (p.temperature, p.top_k, p.top_p, p.min_p, p.seed, s.index, s.num_generated,
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
