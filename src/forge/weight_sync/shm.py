"""Weight sync between processes of one host through shared memory (/dev/shm).

One file per published version, `forge_ws_<name>_v<version>.bin`:

    b"FORGEWS1" | uint64 header length | JSON header {version, entries} | data (64-byte aligned)

The trainer's rank 0 sizes the file, maps it (`torch.from_file(shared=True)`) and copies each
parameter straight into its slice as it is gathered (one FSDP parameter at a time), writes under
a `.tmp` name and renames when complete, then atomically updates `forge_ws_<name>.latest`. A
reader therefore never sees a half-written version, and the version number travels inside the
file it describes. The last `keep` versions are kept; Linux keeps an unlinked file alive for a
reader that has it mapped, so pruning never pulls data from under a reader.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import torch
from torch import nn

from forge.weight_sync.common import (
    WeightSyncError,
    copy_into,
    create_private,
    iter_full_params,
    manifest,
    open_private,
    read_private_text,
    target_params,
    write_private_text,
)
from forge.weight_sync.files import owner, remove_run_files, remove_stale

MAGIC = b"FORGEWS1"
ALIGN = 64
_DTYPE_NAMES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)}


def default_dir() -> Path:
    d = Path("/dev/shm")
    return d if d.is_dir() and os.access(d, os.W_OK) else Path(tempfile.gettempdir())


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class ShmPublisher:
    def __init__(self, model: nn.Module, name: str = "policy", directory: str | Path | None = None,
                 dtype: torch.dtype | None = None, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.model, self.name, self.dtype, self.keep = model, name, dtype, keep
        self.dir = Path(directory) if directory else default_dir()
        self._owner = owner()
        if _is_rank0():  # files of publishers that died without cleaning up (a crashed run's 2 versions + .latest)
            remove_stale(self.dir)

    def path(self, version: int) -> Path:
        return self.dir / f"forge_ws_{self.name}_v{version}.bin"

    @torch.no_grad()
    def publish(self, version: int) -> int:
        """Collective under FSDP (every trainer rank calls it); rank 0 writes."""
        rank0 = _is_rank0()
        entries = manifest(self.model, self.dtype)
        offset = 0
        header_entries = []
        for e in entries:
            header_entries.append([e.name, str(e.dtype).removeprefix("torch."), list(e.shape), offset, e.nbytes])
            offset = _align(offset + e.nbytes)
        header = json.dumps({"version": version, "owner": self._owner, "entries": header_entries}).encode()
        data_start = _align(len(MAGIC) + 8 + len(header))
        total = data_start + offset
        final, tmp = self.path(version), self.path(version).with_suffix(".tmp")
        buf = None
        try:
            if rank0:
                self.dir.mkdir(parents=True, exist_ok=True)
                with create_private(tmp) as f:
                    f.truncate(total)
                    f.write(MAGIC + struct.pack("<Q", len(header)) + header)
                buf = torch.from_file(str(tmp), shared=True, size=total, dtype=torch.uint8)
            for (_name, t), e, h in zip(iter_full_params(self.model), entries, header_entries):
                if buf is not None:
                    start = data_start + h[3]
                    buf[start:start + e.nbytes].view(e.dtype).view(e.shape).copy_(t)
                del t  # FSDP: drop the gathered parameter before the next
        except BaseException:
            if rank0:  # a publish that failed half-way leaves no file the size of the model behind
                tmp.unlink(missing_ok=True)
            raise
        if rank0:
            del buf
            os.replace(tmp, final)
            latest = self.dir / f"forge_ws_{self.name}.latest"
            ltmp = latest.with_suffix(".latest.tmp")
            write_private_text(ltmp, json.dumps({"version": version, "file": final.name, "owner": self._owner}))
            os.replace(ltmp, latest)
            self._prune(version)
        return version

    def _prune(self, newest: int) -> None:
        for f in self.dir.glob(f"forge_ws_{self.name}_v*.bin"):
            try:
                v = int(f.stem.rsplit("_v", 1)[1])
            except ValueError:
                continue
            if v <= newest - self.keep:
                f.unlink(missing_ok=True)

    def close(self) -> None:
        remove_run_files(self.name, self.dir)


def read_header(path: Path) -> tuple[dict, int]:
    with open_private(path) as f:
        head = f.read(len(MAGIC) + 8)
        if len(head) < len(MAGIC) + 8 or head[: len(MAGIC)] != MAGIC:
            raise WeightSyncError(f"'{path}' is not a forge weight file (bad magic)")
        (n,) = struct.unpack("<Q", head[len(MAGIC):])
        raw = f.read(n)
    if len(raw) != n:
        raise WeightSyncError(f"'{path}' is truncated (header)")
    return json.loads(raw), _align(len(MAGIC) + 8 + n)


def read_weights(path: Path, version: int | None = None) -> dict[str, torch.Tensor]:
    """name -> tensor viewing the mapped file (no copy until the receiver copies it)."""
    header, data_start = read_header(path)
    if version is not None and header["version"] != version:
        raise WeightSyncError(f"'{path}' holds version {header['version']}, not {version}")
    size = path.stat().st_size
    buf = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
    out = {}
    for name, dtype, shape, off, nbytes in header["entries"]:
        start = data_start + off
        if start + nbytes > size:
            raise WeightSyncError(f"'{path}' is truncated at '{name}'")
        out[name] = buf[start:start + nbytes].view(_DTYPE_NAMES[dtype]).view(shape)
    return out


def version_path(name: str, version: int, directory: str | Path | None = None) -> Path:
    return (Path(directory) if directory else default_dir()) / f"forge_ws_{name}_v{version}.bin"


class ShmSubscriber:
    def __init__(self, model: nn.Module, name: str = "policy", directory: str | Path | None = None):
        self.model, self.name = model, name
        self.dir = Path(directory) if directory else default_dir()

    def available_version(self) -> int | None:
        latest = self.dir / f"forge_ws_{self.name}.latest"
        try:
            return int(json.loads(read_private_text(latest))["version"])
        except (FileNotFoundError, ValueError, KeyError):
            return None

    @torch.no_grad()
    def fetch(self, version: int | None = None) -> int:
        """Apply `version` (or the newest) into the model; returns the version applied."""
        for _ in range(3):  # the newest file can be pruned between reading `latest` and opening it
            newest = self.available_version()
            if newest is None:
                raise WeightSyncError(f"weight sync '{self.name}': nothing published in {self.dir}")
            v = newest if version is None else version
            path = self.dir / f"forge_ws_{self.name}_v{v}.bin"
            try:
                return self._apply(path, v)
            except FileNotFoundError:
                if version is not None:
                    raise WeightSyncError(f"weight sync '{self.name}': version {version} is not available "
                                          f"(newest is {newest}; older ones are pruned)") from None
        raise WeightSyncError(f"weight sync '{self.name}': could not open the newest version in {self.dir}")

    def _apply(self, path: Path, version: int) -> int:
        weights = read_weights(path, version)
        dst = target_params(self.model, set(weights), f"weight sync '{self.name}'")
        for name, src in weights.items():
            copy_into(dst[name], src, name)
        if dst and next(iter(dst.values())).is_cuda:
            torch.cuda.current_stream().synchronize()  # the mapping must outlive the async H2D copies
        return version
