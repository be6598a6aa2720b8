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
    """Hands out distinct GPUs (one per proc) to replicas; no GPU is ever given twice, unless
    `share=True`: then, once every GPU is taken, further procs share the least-loaded GPUs
    (several processes on one GPU: generator + trainer on a single-GPU host)."""

    def __init__(self, gpu_ids: list[str], share: bool = False):
        if len(set(gpu_ids)) != len(gpu_ids):
            raise ValueError(f"GPU ids must be distinct, got {gpu_ids}")
        self.gpu_ids = list(gpu_ids)
        self.share = share
        self._owner: dict[str, str] = {}  # gpu id -> who holds it (first holder)
        self._load: dict[str, int] = {g: 0 for g in self.gpu_ids}

    @classmethod
    def with_count(cls, count: int, share: bool = False) -> GpuAllocator:
        if count < 0:
            raise ValueError(f"gpu count must be >= 0, got {count}")
        return cls([str(i) for i in range(count)], share=share)

    @property
    def total(self) -> int:
        return len(self.gpu_ids)

    @property
    def free(self) -> list[str]:
        return [g for g in self.gpu_ids if g not in self._owner]

    def allocate(self, n: int, who: str) -> list[str]:
        free = self.free
        if self.share and self.total and n > len(free):
            if n > self.total:
                raise ResourceError(f"{who} needs {n} GPU(s) (one per proc) but the host has {self.total}")
            got = sorted(self.gpu_ids, key=lambda g: (self._load[g], self.gpu_ids.index(g)))[:n]
            for g in got:
                self._owner.setdefault(g, who)
                self._load[g] += 1
            return got
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
            self._load[g] += 1
        return got

    def release(self, gpu_ids: list[str]) -> None:
        for g in gpu_ids:
            self._load[g] = max(0, self._load.get(g, 0) - 1)
            if self._load[g] == 0:
                self._owner.pop(g, None)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (the OS picks it, so two jobs on a host never clash)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def pid_alive(pid: int) -> bool:
    """False once the process is gone or a zombie (killed but not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:  # no procfs (macOS): signal 0 only tells whether the pid exists
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
