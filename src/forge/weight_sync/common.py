"""What every transport shares: full parameters one at a time, manifests, buckets, applying."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn


class WeightSyncError(RuntimeError):
    pass


# /dev/shm is writable by every local user. Weight-sync files are created owner-only, and a reader
# refuses a file another user owns or may write: the cuda_ipc descriptor is unpickled (code would
# run) and a weight file becomes the policy.
def create_private(path: Path) -> BinaryIO:
    """Open `path` for writing, created (or truncated) with mode 0600; a file another user owns
    there is an error that names it."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except PermissionError:
        raise WeightSyncError(f"cannot write weight-sync file '{path}': it exists and belongs to another user "
                              "(remove it, or set the transport's directory to one of your own)") from None
    os.fchmod(fd, 0o600)  # an existing file of ours keeps its old mode otherwise
    return os.fdopen(fd, "wb")


def write_private_text(path: Path, text: str) -> None:
    with create_private(path) as f:
        f.write(text.encode())


def open_private(path: Path) -> BinaryIO:
    """Open a weight-sync file for reading after checking that this user owns it and nobody else
    may write it (raises FileNotFoundError when it does not exist)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    st = os.fstat(fd)
    uid = os.getuid() if hasattr(os, "getuid") else st.st_uid
    if st.st_uid != uid or st.st_mode & 0o022:
        os.close(fd)
        raise WeightSyncError(f"refusing weight-sync file '{path}': owned by uid {st.st_uid} with mode "
                              f"{oct(st.st_mode & 0o777)}; it must belong to this user (uid {uid}) and not be "
                              "writable by group or others")
    return os.fdopen(fd, "rb")


def read_private_text(path: Path) -> str:
    with open_private(path) as f:
        return f.read().decode()


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


def unwrap(model: nn.Module) -> nn.Module:
    """The `CausalLM` inside a trainer engine / LogprobModel / compiled wrapper (HF names)."""
    for attr in ("model",):
        inner = getattr(model, attr, None)
        # TrainEngine.model and LogprobModel.model are CausalLMs; CausalLM.model is DecoderModel (stop there)
        if isinstance(inner, nn.Module) and hasattr(inner, "lm_head"):
            return inner
    return model


def manifest(model: nn.Module, dtype: torch.dtype | None = None) -> list[Entry]:
    """Global (unsharded) names, dtypes and shapes; no communication (DTensor knows its global shape)."""
    return [Entry(n, dtype or p.dtype, tuple(p.shape)) for n, p in unwrap(model).named_parameters()]


def iter_full_params(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) one parameter at a time. Under FSDP2 each is all-gathered just before
    it is yielded and dropped by the caller before the next, so at most one full parameter
    exists besides the shards (never two full copies of the model). Collective: every rank of
    the trainer must iterate."""
    for name, p in unwrap(model).named_parameters():
        t = p.detach()
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        yield name, t


def buckets(entries: list[Entry], bucket_bytes: int) -> list[list[Entry]]:
    """Consecutive entries of one dtype, at most `bucket_bytes` each (a bigger tensor: its own)."""
    out: list[list[Entry]] = []
    size = 0
    for e in entries:
        if out and out[-1][0].dtype == e.dtype and size + e.nbytes <= bucket_bytes:
            out[-1].append(e)
            size += e.nbytes
        else:
            out.append([e])
            size = e.nbytes
    return out


def target_params(model: nn.Module, names: set[str], who: str) -> dict[str, torch.Tensor]:
    params = dict(unwrap(model).named_parameters())
    missing = sorted(set(params) - names)
    extra = sorted(names - set(params))
    if missing or extra:
        raise WeightSyncError(
            f"{who}: the published weights do not fit the receiving model: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
            f"{'...' if len(extra) > 5 else ''}")
    return params


@torch.no_grad()
def copy_into(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if dst.shape != src.shape:
        raise WeightSyncError(f"parameter '{name}': shape {tuple(src.shape)} published, {tuple(dst.shape)} expected")
    dst.copy_(src, non_blocking=True)
