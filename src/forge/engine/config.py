"""`EngineConfig` (how the engine uses the device) and `SamplingParams` (what one request asks for)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch


@dataclass
class EngineConfig:
    """Resources of one `LLMEngine`. The KV cache is allocated once, at construction.

    Cache size: `kv_cache_tokens` if given, else `gpu_memory_fraction` of the device memory left
    free after the weights (CUDA), else `max_num_seqs * max_model_len` tokens (CPU).
    `long_prompt`: what to do with a prompt that leaves no room for a single new token within
    `max_model_len`: "reject" finishes it at once with stop_reason "prompt_too_long" (no
    exception, the rollout goes on); "truncate" keeps its last tokens and records
    `metadata["truncated_prompt_tokens"]`.
    """

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 2048
    kv_cache_tokens: int | None = None
    gpu_memory_fraction: float = 0.9
    block_size: int = 32
    dtype: str | torch.dtype | None = None  # None: bfloat16 on CUDA, float32 on CPU
    device: str | torch.device | None = None  # None: the model's device
    enable_cuda_graphs: bool = True
    cuda_graph_batch_sizes: list[int] | None = None  # None: 1, 2, 4, 8, 16, 32, ... up to max_num_seqs
    attention_backend: str = "auto"  # auto | triton | torch
    fused_decode: bool | None = None  # Triton decode layers + in-graph sampling (forge.engine.fused); None = on CUDA
    fused_prefill: bool | None = None  # with fused decode: the same kernels for prefill; None = on
    prefill_cuda_graphs: bool = True  # fused prefill of fresh prompts: replay graphs of padded (rows, length) buckets
    fast_sampler: bool | None = None  # Triton sampling kernels when no row needs top-k/top-p/min-p; None = on CUDA
    overlap_decode: bool = True  # fused decode: queue step t+1 before reading step t's tokens (see LLMEngine.step)
    overlap_prefill: bool = True  # queue waiting prompts' prefill before reading the in-flight step's tokens
    # fused decode in CUDA graphs, bf16/fp16: time cuBLASLt's candidate algorithms per decode GEMM shape at start-up
    # and keep the fastest (forge.engine.cublaslt); None = on where cuBLASLt is found
    tune_gemms: bool | None = None
    tune_gemms_min_rows: int = 16  # smaller batches keep F.linear (their GEMMs are launch-bound)
    # fused decode: the RMSNorm weights folded into copies of the q/k/v and gate/up weights, 6 launches per layer
    # instead of 8 (forge.engine.fused); None = on for CUDA when the copies take <= 1 GiB
    fold_norms: bool | None = None
    long_prompt: str = "reject"  # reject | truncate
    seed: int = 0  # for requests without their own seed
    # shard the model over this many procs of one replica (forge.engine.tp): rank 0 schedules and samples,
    # the others run `LLMEngine.follow`; the replica's RANK / WORLD_SIZE / MASTER_* env forms the group
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size", "tune_gemms_min_rows",
                     "tensor_parallel_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.block_size:
            raise ValueError(f"EngineConfig.kv_cache_tokens ({self.kv_cache_tokens}) is smaller than one block "
                             f"({self.block_size} tokens)")
        if not 0.0 < self.gpu_memory_fraction <= 1.0:
            raise ValueError(f"EngineConfig.gpu_memory_fraction must be in (0, 1], got {self.gpu_memory_fraction}")
        if self.long_prompt not in ("reject", "truncate"):
            raise ValueError(f"EngineConfig.long_prompt must be 'reject' or 'truncate', got {self.long_prompt!r}")
        if self.attention_backend not in ("auto", "triton", "torch"):
            raise ValueError(f"EngineConfig.attention_backend must be auto|triton|torch, got {self.attention_backend!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | EngineConfig | None) -> EngineConfig:
        return _from_dict(cls, d)


@dataclass
class SamplingParams:
    """Per-request sampling.

    The sampler draws from p = softmax(logits / temperature) restricted to the tokens kept by
    all of: top_k (the k most likely, 0 = off), top_p (the smallest most-likely set whose mass
    reaches top_p, 1.0 = off) and min_p (p >= min_p * max p, 0 = off), all three computed on the
    same full temperature-scaled p, then renormalised. temperature == 0 means greedy (argmax).

    The logprobs returned (what the trainer's importance ratios compare against), the same
    statement as on `forge.types.Completion` (tests/test_logprob_contract.py checks both):
    Returned logprobs are log_softmax(logits / temperature)[token] over the FULL vocabulary:
    temperature-scaled, not truncated or renormalised by top-k/top-p/min-p (what a trainer
    recomputes from its own logits); greedy requests: log_softmax(logits)[token]. With
    `truncated_logprobs=True` they are under the truncated, renormalised distribution actually
    drawn from instead.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int = 256
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    n: int = 1
    logprobs: bool = True
    truncated_logprobs: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"SamplingParams.min_p must be in [0, 1], got {self.min_p}")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be >= 1, got {self.max_tokens}")
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | SamplingParams | None) -> SamplingParams:
        return _from_dict(cls, d)

    def replace(self, **kw: Any) -> SamplingParams:
        return _from_dict(type(self), {**{f.name: getattr(self, f.name) for f in fields(self)}, **kw})


def _from_dict(cls, d):
    if isinstance(d, cls):
        return d
    d = dict(d or {})
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - valid)
    if unknown:
        raise TypeError(f"{cls.__name__}: unknown key(s) {unknown}; valid: {sorted(valid)}")
    return cls(**d)
