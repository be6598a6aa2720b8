"""Weight sync across processes/GPUs with torch.distributed broadcast (NCCL on GPU, gloo on CPU).

A dedicated process group, separate from the trainer's FSDP group, joins the trainer's rank 0
(group rank 0, the source) and every generator process (group ranks 1..N). It is formed from
its own TCPStore at `addr:port`, so it never interferes with either side's default group.

Per publish: a header `[version, n_buckets]` (int64), then the parameters in buckets of at most
`bucket_bytes`, flattened and concatenated per dtype. The manifest (names, shapes, dtypes) is
put in the store once at connect, so both sides derive the same buckets.

Every publish is a collective: the receivers take part on demand (`receive()` / `fetch()`), so
the app runs `Trainer.push_weights` and `Generator.update_weights` concurrently. A receiver
fills a staging copy on a side stream while its engine keeps decoding; the generator then
copies staging -> parameters between requests: a completion never mixes versions.
"""

from __future__ import annotations

import json
import threading
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from forge.models.lora import is_adapter_update
from forge.weight_sync.common import (
    Entry,
    WeightSyncError,
    buckets,
    copy_into,
    iter_full_params,
    manifest,
    target_params,
)

_DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)}


def _make_group(addr: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float):
    store = dist.TCPStore(addr, port, world_size, is_master=rank == 0, timeout=timedelta(seconds=timeout_s))
    prefix = dist.PrefixStore("forge_weight_sync", store)
    if backend == "nccl":
        pg = dist.ProcessGroupNCCL(prefix, rank, world_size)
    elif backend == "gloo":
        pg = dist.ProcessGroupGloo(prefix, rank, world_size, timedelta(seconds=timeout_s))
    else:
        raise ValueError(f"broadcast backend must be nccl or gloo, got {backend!r}")
    return store, pg


def _bcast(pg, t: torch.Tensor) -> None:
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    pg.broadcast([t], opts).wait()


class BroadcastPublisher:
    """Every trainer rank constructs it (FSDP gathers are collective); rank 0 sends."""

    def __init__(self, model: nn.Module, addr: str, port: int, num_receivers: int, *, backend: str | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 bucket_bytes: int = 256 << 20, timeout_s: float = 600.0):
        self.model = model
        self.entries = manifest(model, dtype)
        self.bucket_plan = buckets(self.entries, bucket_bytes)
        first = next(model.parameters())
        self.device = torch.device(device) if device is not None else first.device
        self.backend = backend or ("nccl" if self.device.type == "cuda" else "gloo")
        self.is_source = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
        self.pg = self.store = None
        if self.is_source:
            self.store, self.pg = _make_group(addr, port, 0, num_receivers + 1, self.backend, timeout_s)
            self.store.set("manifest", json.dumps([[e.name, str(e.dtype), list(e.shape)] for e in self.entries]))
            self.store.set("bucket_bytes", str(bucket_bytes))

    @torch.no_grad()
    def publish(self, version: int) -> int:
        params = iter_full_params(self.model)
        if self.is_source:
            _bcast(self.pg, torch.tensor([version, len(self.bucket_plan)], dtype=torch.int64, device=self.device))
        for plan in self.bucket_plan:
            flat = None
            if self.is_source:
                flat = torch.empty(sum(e.numel for e in plan), dtype=plan[0].dtype, device=self.device)
            off = 0
            for e in plan:
                name, t = next(params)
                assert name == e.name, (name, e.name)
                if flat is not None:
                    flat[off:off + e.numel].view(e.shape).copy_(t)
                off += e.numel
                del t  # at most one gathered parameter alive besides the bucket
            if self.is_source:
                _bcast(self.pg, flat)
        return version

    def close(self) -> None:
        self.pg = None


class BroadcastSubscriber:
    """One per generator process; `rank` is 1..num_receivers in the weight-sync group.

    Receives on demand: each `receive()` takes part in exactly one `publish()` (a collective,
    so the app runs the trainer's push and the generators' update concurrently). Nothing is
    left posted between syncs: a pending NCCL receive would spin on the GPU and stall every
    device-wide synchronisation of the generator. The receive runs on a side stream into a
    staging copy, so decoding on the default stream goes on while the weights stream in.
    """

    def __init__(self, model: nn.Module, addr: str, port: int, rank: int, num_receivers: int, *,
                 backend: str | None = None, timeout_s: float = 600.0):
        if not 1 <= rank <= num_receivers:
            raise ValueError(f"receiver rank must be in [1, {num_receivers}], got {rank}")
        self.model = model
        self.device = next(model.parameters()).device
        self.backend = backend or ("nccl" if self.device.type == "cuda" else "gloo")
        self.store, self.pg = _make_group(addr, port, rank, num_receivers + 1, self.backend, timeout_s)
        raw = json.loads(self.store.get("manifest"))
        self.entries = [Entry(n, _DTYPES[d], tuple(s)) for n, d, s in raw]
        self.bucket_plan = buckets(self.entries, int(self.store.get("bucket_bytes")))
        names = {e.name for e in self.entries}
        # LoRA adapters have no parameter of their own here: the generator merges them (fetch() is full weights only)
        self.dst = None if is_adapter_update(names) else target_params(model, names, "broadcast weight sync")
        self.staging = {e.name: torch.empty(e.shape, dtype=e.dtype, device=self.device) for e in self.entries}
        self.staged_version: int | None = None
        self._lock = threading.Lock()
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def available_version(self) -> int | None:
        return self.staged_version

    @torch.no_grad()
    def receive(self) -> tuple[int, dict[str, torch.Tensor]]:
        """Take part in the trainer's next publish; returns (version, name -> staged tensor). The
        staged tensors are complete on return and stay valid until the next `receive()`."""
        with self._lock:
            if self._stream is None:
                return self._receive_into_staging()
            with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
                out = self._receive_into_staging()
            self._stream.synchronize()
            return out

    def _receive_into_staging(self) -> tuple[int, dict[str, torch.Tensor]]:
        head = torch.zeros(2, dtype=torch.int64, device=self.device)
        _bcast(self.pg, head)
        version, n = head.tolist()
        if n != len(self.bucket_plan):
            raise WeightSyncError(f"publisher sent {n} buckets, receiver planned {len(self.bucket_plan)}")
        for plan in self.bucket_plan:
            flat = torch.empty(sum(e.numel for e in plan), dtype=plan[0].dtype, device=self.device)
            _bcast(self.pg, flat)
            off = 0
            for e in plan:
                self.staging[e.name].copy_(flat[off:off + e.numel].view(e.shape))
                off += e.numel
        self.staged_version = int(version)
        return int(version), self.staging

    @torch.no_grad()
    def fetch(self, version: int | None = None) -> int:
        """Receive publishes until `version` (or the next one) arrives, apply it to the model;
        returns the version applied."""
        while True:
            got, staging = self.receive()
            if version is None or got >= version:
                break
        if self.dst is None:
            raise WeightSyncError("broadcast weight sync: the publisher sends LoRA adapters; apply them with "
                                  "forge.models.lora.AdapterMerger (the Generator does), not fetch()")
        for name, src in staging.items():
            copy_into(self.dst[name], src, name)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return got

    def close(self) -> None:
        self.pg = None
