"""Weight sync between processes that share one GPU, through CUDA IPC (no host round trip).

The trainer's rank 0 keeps one staging buffer per dtype on its GPU, allocated at the first
publish. `publish(v)` copies every (gathered) parameter into its slice, synchronises the stream,
then atomically writes a small descriptor `forge_ipc_<name>.json` in /dev/shm: the version, the
manifest, the GPU's UUID and the pickled IPC handles of the staging buffers (torch's own
`reduce_tensor`, shared anew per publish). A generator process on the same GPU maps them for each
update (a mapping of the trainer's memory, not a copy), copies staging -> its parameters between
requests and drops the mapping.

One staging copy: the trainer must not publish version v+1 before the generators applied v —
the app syncs push -> update before the next step, so it never does. Processes on different GPUs
use `broadcast` (NCCL) instead; a UUID mismatch is an error that says so.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
from pathlib import Path

import torch
from torch import nn

from forge.weight_sync.common import (
    Entry,
    WeightSyncError,
    iter_full_params,
    manifest,
    read_private_text,
    target_params,
    write_private_text,
)
from forge.weight_sync.files import owner, remove_stale
from forge.weight_sync.shm import _DTYPE_NAMES, _is_rank0, default_dir


def _gpu_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


def descriptor_path(name: str, directory: str | Path | None = None) -> Path:
    return Path(directory or default_dir()) / f"forge_ipc_{name}.json"


class CudaIpcPublisher:
    def __init__(self, model: nn.Module, name: str = "policy", directory: str | Path | None = None,
                 dtype: torch.dtype | None = None):
        self.model, self.name, self.dtype = model, name, dtype
        self.path = descriptor_path(name, directory)
        self.entries = manifest(model, dtype)
        self.device = next(model.parameters()).device
        if self.device.type != "cuda":
            raise WeightSyncError(f"cuda_ipc weight sync needs the trainer on a GPU (it is on {self.device}); "
                                  "use 'shm' between CPU processes")
        self.is_source = _is_rank0()
        self._owner = owner()
        if self.is_source:  # descriptors of publishers that died without cleaning up
            remove_stale(self.path.parent)
        self.staging: dict[torch.dtype, torch.Tensor] = {}
        self.views: dict[str, torch.Tensor] = {}

    def _allocate(self) -> None:
        totals: dict[torch.dtype, int] = {}
        for e in self.entries:
            totals[e.dtype] = totals.get(e.dtype, 0) + e.numel
        self.staging = {dt: torch.empty(n, dtype=dt, device=self.device) for dt, n in totals.items()}
        offsets = dict.fromkeys(totals, 0)
        for e in self.entries:
            off = offsets[e.dtype]
            self.views[e.name] = self.staging[e.dtype][off:off + e.numel].view(e.shape)
            offsets[e.dtype] = off + e.numel

    def _share(self) -> dict[str, str]:
        """Fresh IPC handles of the staging buffers. torch counts references per share: each
        `reduce_tensor` expects one mapping by a consumer, released when that mapping is dropped;
        the generator maps once per update, so every publish shares anew."""
        from torch.multiprocessing.reductions import reduce_tensor

        return {str(dt).removeprefix("torch."): base64.b64encode(pickle.dumps(reduce_tensor(buf))).decode()
                for dt, buf in self.staging.items()}

    @torch.no_grad()
    def publish(self, version: int) -> int:
        if self.is_source and not self.staging:
            self._allocate()
        for name, t in iter_full_params(self.model):  # collective under FSDP: every rank iterates
            if self.is_source:
                self.views[name].copy_(t)
            del t
        if not self.is_source:
            return version
        torch.cuda.current_stream(self.device).synchronize()  # the data is in place before it is announced
        desc = {"version": int(version), "gpu_uuid": _gpu_uuid(self.device), "pid": os.getpid(), "owner": self._owner,
                "entries": [[e.name, str(e.dtype).removeprefix("torch."), list(e.shape)] for e in self.entries],
                "handles": self._share()}
        tmp = self.path.with_suffix(".tmp")
        write_private_text(tmp, json.dumps(desc))
        os.replace(tmp, self.path)
        return version

    def close(self) -> None:
        if self.is_source:
            self.path.unlink(missing_ok=True)
        self.staging, self.views = {}, {}


class CudaIpcReader:
    """The generator side: maps each publish's handles once, hands out views of the staging buffers."""

    def __init__(self, name: str = "policy", directory: str | Path | None = None, device: torch.device | None = None):
        self.path = descriptor_path(name, directory)
        self.name = name
        self.device = device or torch.device("cuda", torch.cuda.current_device())
        self._mapped: dict[str, torch.Tensor] = {}
        self._key: tuple | None = None

    def weights(self, version: int) -> dict[str, torch.Tensor]:
        try:
            desc = json.loads(read_private_text(self.path))  # owner-checked: the handles are unpickled
        except FileNotFoundError:
            raise WeightSyncError(f"cuda_ipc weight sync '{self.name}': nothing published at '{self.path}'") from None
        if desc["version"] != version:
            raise WeightSyncError(f"cuda_ipc weight sync '{self.name}': version {version} requested but version "
                                  f"{desc['version']} is published")
        mine = _gpu_uuid(self.device)
        if desc["gpu_uuid"] != mine:
            raise WeightSyncError(f"cuda_ipc weight sync '{self.name}': the trainer is on GPU {desc['gpu_uuid']}, "
                                  f"this generator on {mine}; cuda_ipc needs one shared GPU — use 'broadcast' (NCCL) "
                                  "between GPUs")
        key = (desc["pid"], tuple(sorted(desc["handles"].items())))
        if key != self._key:  # a new publish (fresh handles: one mapping per share) or first use
            self._mapped = {}
            for dt, blob in desc["handles"].items():
                fn, args = pickle.loads(base64.b64decode(blob))
                self._mapped[dt] = fn(*args)
            self._key = key
        out, offsets = {}, dict.fromkeys(self._mapped, 0)
        for n, dt, shape in desc["entries"]:
            e = Entry(n, _DTYPE_NAMES[dt], tuple(shape))
            off = offsets[dt]
            out[n] = self._mapped[dt][off:off + e.numel].view(e.shape)
            offsets[dt] = off + e.numel
        return out


class CudaIpcSubscriber:
    def __init__(self, model: nn.Module, name: str = "policy", directory: str | Path | None = None):
        self.model = model
        self.reader = CudaIpcReader(name, directory, next(model.parameters()).device)

    def available_version(self) -> int | None:
        try:
            return int(json.loads(read_private_text(self.reader.path))["version"])
        except (FileNotFoundError, ValueError, KeyError):
            return None

    @torch.no_grad()
    def fetch(self, version: int | None = None) -> int:
        v = self.available_version() if version is None else version
        if v is None:
            raise WeightSyncError(f"cuda_ipc weight sync '{self.reader.name}': nothing published yet")
        src = self.reader.weights(v)
        dst = target_params(self.model, set(src), "cuda_ipc weight sync")
        for n, t in src.items():
            dst[n].copy_(t)
        torch.cuda.current_stream(self.reader.device).synchronize()
        return v
