"""A request (one prompt, `n` samples) and its sequences (one per sample)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from forge.engine.config import SamplingParams

_seq_ids = itertools.count()


class SeqStatus(Enum):
    WAITING = "waiting"  # queued, or partially prefilled (chunked prefill), or preempted
    RUNNING = "running"  # decoding
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One sample. `token_ids` = prompt + generated; `num_computed` of them have KV in the cache."""

    request: Request
    index: int  # sample index within the request (0..n-1)
    token_ids: list[int]
    num_prompt_tokens: int
    fork_n: int = 1  # >1 for a request's first sequence: after its prefill it forks n-1 siblings
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    logprobs: list[float] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    stop_reason: str | None = None
    text: str | None = None
    seq_id: int = field(default_factory=lambda: next(_seq_ids))

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def generated(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    def __len__(self) -> int:
        return len(self.token_ids)


@dataclass
class SampleOutput:
    index: int
    token_ids: list[int]
    logprobs: list[float]
    stop_reason: str  # "stop" | "length" | "prompt_too_long"
    text: str | None = None


@dataclass
class RequestOutput:
    request_id: int
    prompt_ids: list[int]
    outputs: list[SampleOutput]
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class Request:
    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int  # params.max_tokens capped so that prompt + generated <= max_model_len
    metadata: dict[str, Any] = field(default_factory=dict)
    seqs: list[Sequence] = field(default_factory=list)
    num_finished: int = 0
    seed: int | None = None  # params.seed, else one the engine derives from its seed and request_id

    @property
    def finished(self) -> bool:
        return self.num_finished == self.params.n

    def output(self) -> RequestOutput:
        seqs = sorted(self.seqs, key=lambda s: s.index)
        outs = [SampleOutput(s.index, s.generated, s.logprobs, s.stop_reason or "stop", s.text) for s in seqs]
        return RequestOutput(self.request_id, self.prompt_ids, outs, dict(self.metadata))
