"""Continuous batching: which sequences run in the next forward pass.

Each engine step is either a prefill step (waiting sequences, prompt chunks of at most
`max_num_batched_tokens` tokens in total) or a decode step (one token for every running
sequence). Prefill goes first whenever a waiting request fits, so new requests join a batch
that is already decoding; finished sequences leave and free their blocks at once.
Back-pressure: a request waits until the cache has room for its prompt; a decoding sequence
that needs a new block when none is free preempts the most recently admitted sequence
(its blocks are freed, it goes back to the front of the queue and is recomputed later).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from forge.engine.block_manager import BlockManager
from forge.engine.config import EngineConfig
from forge.engine.sequence import SeqStatus, Sequence


@dataclass
class PrefillChunk:
    seq: Sequence
    start: int  # first token to compute (= seq.num_computed)
    end: int  # one past the last; end == len(seq) means the prefill completes and a token is sampled


@dataclass
class Batch:
    prefill: list[PrefillChunk] | None = None
    decode: list[Sequence] | None = None


class Scheduler:
    def __init__(self, config: EngineConfig, blocks: BlockManager):
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _slots_used(self) -> int:
        # a waiting sequence already holding blocks (mid chunked prefill) counts as admitted
        return len(self.running) + sum(s.fork_n for s in self.waiting if s.block_table)

    def schedule(self) -> Batch | None:
        chunks = self.schedule_prefill()
        if chunks:
            return Batch(prefill=chunks)
        if self.running:
            return Batch(decode=self._schedule_decode())
        return None

    def schedule_prefill(self) -> list[PrefillChunk]:
        """The prompt chunks of the next prefill step (empty: nothing waiting fits)."""
        budget = self.config.max_num_batched_tokens
        chunks: list[PrefillChunk] = []
        slots = self._slots_used()
        # blocks promised to admitted prompts for their fork copies (one per extra sample)
        reserved = sum(s.fork_n - 1 for s in self.waiting if s.block_table)
        for seq in list(self.waiting):
            if budget <= 0 or len(chunks) >= self.config.max_num_seqs:
                break
            if not seq.block_table:
                # admission: room for the whole prompt now, plus one block per extra sample (fork copies)
                if slots + seq.fork_n > self.config.max_num_seqs:
                    break
                if self.blocks.blocks_for(len(seq)) + seq.fork_n - 1 > self.blocks.num_free - reserved:
                    break
                self.blocks.ensure(seq, len(seq))
                slots += seq.fork_n
                reserved += seq.fork_n - 1
            n = min(len(seq) - seq.num_computed, budget)
            chunks.append(PrefillChunk(seq, seq.num_computed, seq.num_computed + n))
            budget -= n
        return chunks

    def _schedule_decode(self) -> list[Sequence]:
        batch: list[Sequence] = []
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            # the token to write sits at position num_computed
            while not self.blocks.ensure(seq, seq.num_computed + 1):
                # evict the most recently admitted sequence not yet in this batch; else this one
                victim = self.running[-1] if len(self.running) - 1 > i else seq
                self.preempt(victim)
                if victim is seq:
                    break
            if seq.status is SeqStatus.RUNNING:
                batch.append(seq)
                i += 1
        return batch

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.status = SeqStatus.WAITING
        seq.fork_n = 1
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish_prefill(self, seq: Sequence) -> None:
        self.waiting.remove(seq)
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        self.blocks.release(seq)
        seq.status = SeqStatus.FINISHED
