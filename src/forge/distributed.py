"""The replica's process group, from the env the launcher sets.

The monarch backend (and torchrun) set RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT for the
procs of one replica; trainer (FSDP2, TP) and generator (TP) form their group from them: gloo on
CPU, NCCL on GPU.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def init_distributed(device: torch.device, world_size: int, rank: int, timeout_s: float = 600.0) -> bool:
    """Join the replica's process group (idempotent). Returns whether a group is in use."""
    if world_size <= 1:
        return False
    if dist.is_initialized():
        if dist.get_world_size() != world_size:
            raise RuntimeError(f"a process group of size {dist.get_world_size()} exists; this process needs {world_size}")
        return True
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"a replica of {world_size} procs needs {missing} in the environment to form its process group "
            "(the monarch backend sets them; the local backend runs one process per replica)")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)
    return True
