"""Moving the trainer's weights to the generators, with the version number attached.

    pub = WeightPublisher(trainer_model, transport="inproc")        # trainer side
    pub.publish(version)
    sub = WeightSubscriber(generator_model, transport="inproc")     # generator side
    applied = sub.fetch(version)                                    # between requests

Transports: `inproc` (one process, tensors stay on device; see inproc.py for the staged /
direct / share modes), `shm` (processes on one host, /dev/shm), `cuda_ipc` (processes sharing
one GPU: the generator maps the trainer's staging buffer, device-to-device copy), `broadcast`
(torch.distributed broadcast in buckets, NCCL across GPUs / gloo on CPU). FSDP shards are gathered one parameter
at a time on the publishing side, never a whole second copy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from forge.weight_sync.common import WeightSyncError, iter_full_params, manifest, read_private_text
from forge.weight_sync.files import remove_run_files, remove_stale
from forge.weight_sync.inproc import clear_registry, published_version, register_model

TRANSPORTS = ("inproc", "shm", "cuda_ipc", "broadcast")


def WeightPublisher(model: nn.Module, transport: str = "inproc", **kw: Any):
    if transport == "inproc":
        from forge.weight_sync.inproc import InprocPublisher

        return InprocPublisher(model, **kw)
    if transport == "shm":
        from forge.weight_sync.shm import ShmPublisher

        return ShmPublisher(model, **kw)
    if transport == "cuda_ipc":
        from forge.weight_sync.cuda_ipc import CudaIpcPublisher

        return CudaIpcPublisher(model, **kw)
    if transport == "broadcast":
        from forge.weight_sync.broadcast import BroadcastPublisher

        return BroadcastPublisher(model, **kw)
    raise ValueError(f"weight sync transport must be one of {TRANSPORTS}, got {transport!r}")


def WeightSubscriber(model: nn.Module, transport: str = "inproc", **kw: Any):
    if transport == "inproc":
        from forge.weight_sync.inproc import InprocSubscriber

        return InprocSubscriber(model, **kw)
    if transport == "shm":
        from forge.weight_sync.shm import ShmSubscriber

        return ShmSubscriber(model, **kw)
    if transport == "cuda_ipc":
        from forge.weight_sync.cuda_ipc import CudaIpcSubscriber

        return CudaIpcSubscriber(model, **kw)
    if transport == "broadcast":
        from forge.weight_sync.broadcast import BroadcastSubscriber

        return BroadcastSubscriber(model, **kw)
    raise ValueError(f"weight sync transport must be one of {TRANSPORTS}, got {transport!r}")


def get_weights(version: int, name: str = "policy", transport: str | None = None,
                directory: str | None = None, device: Any = None) -> dict:
    """name -> tensor of the published `version`, for `Generator.update_weights(version)`.

    transport None: `FORGE_WEIGHT_SYNC` if set, else in-process when this process has a staged
    publish under `name`, else shared memory. Raises if that exact version is not available,
    so a generator never labels weights with the wrong version.
    """
    import os

    from forge.weight_sync.inproc import published_version, staged_weights

    transport = transport or os.environ.get("FORGE_WEIGHT_SYNC") or (
        "inproc" if published_version(name) is not None else "shm")
    if transport == "inproc":
        return staged_weights(name, version)
    if transport == "shm":
        from forge.weight_sync.shm import read_weights, version_path

        path = version_path(name, version, directory)
        if not path.is_file():
            raise WeightSyncError(f"weight sync '{name}': version {version} not found at '{path}'")
        return read_weights(path, version)
    if transport == "cuda_ipc":
        # mapped per update and released once the generator copied it: no mapping of the trainer's
        # memory outlives the update (a live one at exit stalls the processes' CUDA IPC teardown)
        from forge.weight_sync.cuda_ipc import CudaIpcReader

        return CudaIpcReader(name, directory, device).weights(version)
    raise ValueError(f"get_weights supports transports inproc, shm and cuda_ipc (broadcast needs a WeightSubscriber), "
                     f"got {transport!r}")


def available_version(name: str = "policy", transport: str | None = None, directory: str | None = None) -> int | None:
    """The newest version published under `name` (None: nothing yet), for the transports a
    generator fetches from by version (inproc, shm, cuda_ipc)."""
    from forge.weight_sync.shm import default_dir

    transport = transport or os.environ.get("FORGE_WEIGHT_SYNC") or (
        "inproc" if published_version(name) is not None else "shm")
    if transport == "inproc":
        return published_version(name)
    path = Path(directory or default_dir()) / (f"forge_ws_{name}.latest" if transport == "shm"
                                               else f"forge_ipc_{name}.json")
    try:
        return int(json.loads(read_private_text(path))["version"])
    except (FileNotFoundError, ValueError, KeyError):
        return None


def cleanup_run(sync: dict[str, Any]) -> list:
    """Remove the files a run's weight sync left in /dev/shm (`sync`: the trainer's weight_sync
    block, with its transport and name). Meant for a `finally`: a crashed run leaves nothing behind."""
    if sync.get("transport") not in ("shm", "cuda_ipc") or not sync.get("name"):
        return []
    from forge.weight_sync.shm import default_dir

    return remove_run_files(sync["name"], sync.get("directory") or default_dir())


__all__ = ["TRANSPORTS", "WeightPublisher", "WeightSubscriber", "WeightSyncError", "available_version", "cleanup_run",
           "clear_registry", "get_weights", "iter_full_params", "manifest", "register_model", "remove_run_files",
           "remove_stale"]
