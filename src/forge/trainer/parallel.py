"""FSDP2 sharding of the trainer's model, and the few collectives the trainer step needs.

The monarch backend (and torchrun) set RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT for the
procs of one replica; the trainer forms its data-parallel group from them: gloo on CPU, NCCL on
GPU. FSDP2 (`fully_shard`) wraps each DecoderLayer, then the root, as torchtitan does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from forge.distributed import init_distributed

__all__ = ["init_distributed", "apply_fsdp", "all_reduce_sum", "all_reduce_max", "full_tensor"]


def apply_fsdp(root: nn.Module, layers: nn.ModuleList, param_dtype: torch.dtype | None = None) -> nn.Module:
    """Shard each layer, then the root (embeddings, final norm, lm_head stay in the root group).

    param_dtype: FSDP mixed precision (e.g. bf16 compute with fp32 master weights, fp32 reduce).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()
    n = len(layers)
    for i, layer in enumerate(layers):
        # the last layer is needed again right away in backward: keep it unsharded after forward
        fully_shard(layer, mp_policy=mp, reshard_after_forward=i < n - 1)
    fully_shard(root, mp_policy=mp)
    return root


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over the group in one collective (identity without one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(value: int, device: torch.device) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 DTensor parameter (a collective), or `t` itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
