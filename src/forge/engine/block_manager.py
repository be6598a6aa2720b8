"""Paged KV-cache bookkeeping: a free list of fixed-size blocks with reference counts.

Block 0 is never handed out: padded rows of a batch write their k/v there, so the write is one
unconditional scatter. Reference counts let the `n` samples of one prompt share the prompt's
full blocks; only the last, partially filled block is copied per sample (copy on fork).
"""

from __future__ import annotations

from collections import deque

from forge.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks (one is scratch), got {num_blocks}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.ref = [0] * num_blocks
        self.free: deque[int] = deque(range(1, num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def capacity_blocks(self) -> int:
        return self.num_blocks - 1

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def ensure(self, seq: Sequence, num_tokens: int) -> bool:
        """Give `seq` blocks for `num_tokens` tokens; False (nothing changed) if the cache is short."""
        need = self.blocks_for(num_tokens) - len(seq.block_table)
        if need <= 0:
            return True
        if need > len(self.free):
            return False
        for _ in range(need):
            b = self.free.popleft()
            self.ref[b] = 1
            seq.block_table.append(b)
        return True

    def release(self, seq: Sequence) -> None:
        for b in seq.block_table:
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free.append(b)
        seq.block_table = []
        seq.num_computed = 0

    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int] | None:
        """Share the parent's computed full blocks with `child`; copy a partial last block.

        Returns (src, dst) when the caller must copy one block's k/v, else None. The caller
        checked that a free block exists (admission reserves one per sample).
        """
        full, rem = divmod(parent.num_computed, self.block_size)
        shared = parent.block_table[:full]
        for b in shared:
            self.ref[b] += 1
        child.block_table = list(shared)
        child.num_computed = parent.num_computed
        if rem == 0:
            return None
        dst = self.free.popleft()
        self.ref[dst] = 1
        child.block_table.append(dst)
        return parent.block_table[full], dst
