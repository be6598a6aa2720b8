"""FSDP2 sharding of the trainer's model, and the few collectives the trainer step needs.

The monarch backend (and torchrun) set RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT for the
procs of one replica; the trainer forms its data-parallel group from them: gloo on CPU, NCCL on
GPU. FSDP2 (`fully_shard`) wraps each DecoderLayer, then the root, as torchtitan does. With tensor
parallelism (`forge.trainer.tensor_parallel`) the procs form a 2-D mesh `("dp_shard", "tp")` and
FSDP2 shards over its `dp_shard` dimension only (`build_mesh`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from forge.distributed import init_distributed

__all__ = ["init_distributed", "apply_fsdp", "build_mesh", "all_reduce_sum", "all_reduce_max", "full_tensor"]


def apply_fsdp(root: nn.Module, layers: nn.ModuleList, param_dtype: torch.dtype | None = None,
               mesh: DeviceMesh | None = None) -> nn.Module:
    """Shard each layer, then the root (embeddings, final norm, lm_head stay in the root group).

    param_dtype: FSDP mixed precision (e.g. bf16 compute with fp32 master weights, fp32 reduce).
    mesh: the data-parallel mesh (the `dp_shard` dimension under tensor parallelism; default: all ranks).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()
    n = len(layers)
    for i, layer in enumerate(layers):
        # the last layer is needed again right away in backward: keep it unsharded after forward
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=i < n - 1)
    fully_shard(root, mesh=mesh, mp_policy=mp)
    return root


def all_reduce_sum(values: list[float], device: torch.device, group: dist.ProcessGroup | None = None) -> list[float]:
    """Sum a few numbers over `group` (default: all ranks) in one collective (identity without one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, group=group)
    return t.tolist()


def build_mesh(device: torch.device, dp: int, tp: int) -> DeviceMesh:
    """The 2-D mesh `("dp_shard", "tp")`: ranks r = dp_rank * tp + tp_rank (a TP group is consecutive ranks)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dp, tp), mesh_dim_names=("dp_shard", "tp"))


def all_reduce_max(value: int, device: torch.device) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 DTensor parameter (a collective), or `t` itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
