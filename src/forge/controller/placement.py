"""Host resources handed to replicas: GPU indices and free TCP ports.

Kept apart from the Monarch backend so the allocation logic is testable on a CPU-only
machine (with a fake GPU count) and reusable by future host-mesh / SLURM placement.
"""

from __future__ import annotations

import os
import socket

from forge.controller.errors import ResourceError


def visible_gpu_ids() -> list[str]:
    """The GPU ids this process may hand out, honouring an outer CUDA_VISIBLE_DEVICES."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [x.strip() for x in env.split(",") if x.strip() and x.strip() != "-1"]
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [str(i) for i in range(n)]


class GpuAllocator:
    """Hands out distinct GPUs (one per proc) to replicas; no GPU is ever given twice."""

    def __init__(self, gpu_ids: list[str]):
        if len(set(gpu_ids)) != len(gpu_ids):
            raise ValueError(f"GPU ids must be distinct, got {gpu_ids}")
        self.gpu_ids = list(gpu_ids)
        self._owner: dict[str, str] = {}  # gpu id -> who holds it

    @classmethod
    def with_count(cls, count: int) -> "GpuAllocator":
        if count < 0:
            raise ValueError(f"gpu count must be >= 0, got {count}")
        return cls([str(i) for i in range(count)])

    @property
    def total(self) -> int:
        return len(self.gpu_ids)

    @property
    def free(self) -> list[str]:
        return [g for g in self.gpu_ids if g not in self._owner]

    def allocate(self, n: int, who: str) -> list[str]:
        free = self.free
        if n > len(free):
            held = sorted(set(self._owner.values()))
            raise ResourceError(
                f"{who} needs {n} GPU(s) (one per proc) but the host has {self.total} "
                f"({len(free)} free; held by: {', '.join(held) or 'nobody'}). "
                "Lower procs/num_replicas, or set with_gpus: false for this service."
            )
        got = free[:n]
        for g in got:
            self._owner[g] = who
        return got

    def release(self, gpu_ids: list[str]) -> None:
        for g in gpu_ids:
            self._owner.pop(g, None)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (the OS picks it, so two jobs on a host never clash)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
