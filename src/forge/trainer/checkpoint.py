"""Training checkpoints with torch DCP, written so that a crash never costs the last good one.

Layout of `dir/step_N/`:
    .metadata, __*.distcp        DCP: model + optimizer (sharded, reshardable to another world size)
    trainer_state.pt             step, lr scheduler, the app's opaque `extra` (rank 0)
    rng_rank{r}.pt               torch / cuda / python / numpy RNG of each rank
    COMPLETE.json                written last: step, world size, every file with its size

A save writes `dir/step_N.tmp/`, writes COMPLETE.json last, fsyncs, then renames the directory
to `step_N` (atomic on POSIX). A crash mid-save leaves only a `.tmp` directory, which readers
ignore and the next save removes. `latest_checkpoint` checks COMPLETE.json and file sizes, so a
truncated file is caught before DCP reads garbage.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

log = logging.getLogger(__name__)

MARKER = "COMPLETE.json"
STATE_FILE = "trainer_state.pt"
_STEP_RE = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt (the message names the file)."""


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _dist():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # some filesystems do not support directory fsync
        pass


def _options(model: nn.Module) -> StateDictOptions:
    """Frozen parameters (a LoRA run's base model) are not saved: they are the checkpoint the run
    started from, and a LoRA checkpoint then holds only the adapters and their optimizer state.
    Loading such a checkpoint leaves the frozen ones as they are (non-strict; `_check_shapes`
    has already matched every trainable key)."""
    frozen = any(not p.requires_grad for p in model.parameters())
    return StateDictOptions(ignore_frozen_params=frozen, strict=not frozen)


def _trainable_only(model: nn.Module, msd: dict[str, Any]) -> dict[str, Any]:
    """`ignore_frozen_params` keeps a tied frozen weight's second name (`lm_head.weight` tied to the
    embeddings); drop every name of a frozen parameter."""
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {k: v for k, v in msd.items() if k not in frozen} if frozen else msd


def rng_state() -> dict[str, Any]:
    st = np.random.get_state()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"kind": st[0], "keys": torch.from_numpy(st[1].astype(np.int64)), "pos": int(st[2]),
                  "has_gauss": int(st[3]), "cached_gaussian": float(st[4])},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    n = st["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Every `step_N` directory (complete or not), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def validate_checkpoint(path: str | Path) -> dict[str, Any]:
    """Return the completion record, or raise CheckpointError naming what is wrong."""
    path = Path(path)
    marker = path / MARKER
    if not marker.is_file():
        raise CheckpointError(f"checkpoint '{path}' is incomplete: no {MARKER} (the save was interrupted)")
    try:
        info = json.loads(marker.read_text())
        files = info["files"]
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint '{path}': {MARKER} is unreadable ({e})") from e
    for rel, size in files.items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint '{path}': file '{f}' is missing")
        actual = f.stat().st_size
        if actual != size:
            raise CheckpointError(f"checkpoint '{path}': file '{f}' is truncated or altered "
                                  f"({actual} bytes, {size} expected)")
    return info


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest checkpoint that passes `validate_checkpoint`; broken ones are skipped with a warning."""
    for step, path in reversed(list_checkpoints(root)):
        try:
            validate_checkpoint(path)
            return path
        except CheckpointError as e:
            log.warning("skipping checkpoint step %d: %s", step, e)
    return None


def save_checkpoint(
    root: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: Any = None, extra: dict[str, Any] | None = None, keep_last_n: int | None = None,
) -> Path:
    """Collective under a process group: every rank calls it. Returns the final directory."""
    root = Path(root)
    rank = dist.get_rank() if _dist() else 0
    world = dist.get_world_size() if _dist() else 1
    final, tmp = root / f"step_{step}", root / f"step_{step}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("step_*.tmp"):  # leftovers of interrupted saves
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    msd, osd = get_state_dict(model, optimizer, options=_options(model))
    msd = _trainable_only(model, msd)
    try:
        with warnings.catch_warnings():  # single-process save is intended when there is no group
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
        torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
        if rank == 0:
            torch.save({"step": step, "scheduler": scheduler.state_dict() if scheduler is not None else None,
                        "extra": extra or {}, "world_size": world}, tmp / STATE_FILE)
    except (Exception, CheckpointException) as e:  # e.g. a full disk: the previous checkpoints stay as they are
        shutil.rmtree(tmp, ignore_errors=True)  # give back the space the partial write took
        raise CheckpointError(f"saving checkpoint step {step} to '{tmp}' failed: {_dcp_cause(e)}; "
                              f"the previous checkpoints are untouched") from e
    _barrier()
    if rank == 0:
        files = {}
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
                files[str(f.relative_to(tmp))] = f.stat().st_size
        marker = tmp / MARKER
        marker.write_text(json.dumps({"step": step, "world_size": world, "files": files}, indent=1))
        with open(marker, "rb+") as fh:
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step: swap, so a good copy exists at every instant
            old = root / f"step_{step}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        if keep_last_n:
            prune(root, keep_last_n)
    _barrier()
    return final


def prune(root: str | Path, keep_last_n: int) -> list[Path]:
    """Delete all but the newest `keep_last_n` complete checkpoints (incomplete ones count for nothing)."""
    if keep_last_n < 1:
        raise ValueError(f"keep_last_n must be >= 1, got {keep_last_n}")
    good = []
    for _, p in list_checkpoints(root):
        try:
            validate_checkpoint(p)
            good.append(p)
        except CheckpointError:
            pass
    removed = good[:-keep_last_n]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


class CheckpointMismatchError(ValueError):
    """A good checkpoint of another model: not corruption, so resuming never falls back past it
    to an older one (or to a fresh start)."""


def _dcp_cause(e: BaseException) -> str:
    """The first rank's own exception, not DCP's wrapper with every rank's traceback."""
    if isinstance(e, CheckpointException) and e.failures:
        rank, (exc, _) = next(iter(e.failures.items()))
        return f"rank {rank}: {type(exc).__name__}: {exc}"
    return f"{type(e).__name__}: {e}"


def _check_shapes(path: Path, model_sd: dict[str, Any]) -> None:
    """Compare the model's parameter shapes with the checkpoint's before DCP reads anything."""
    try:
        meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as e:  # noqa: BLE001 — unreadable metadata is corruption
        raise CheckpointError(f"checkpoint '{path}': DCP metadata is unreadable ({type(e).__name__}: {e})") from e
    stored = {k[len("model."):]: m for k, m in meta.items() if k.startswith("model.")}
    missing = sorted(k for k in model_sd if k not in stored)
    wrong = [(k, tuple(stored[k].size), tuple(v.shape)) for k, v in model_sd.items()
             if k in stored and hasattr(stored[k], "size") and tuple(stored[k].size) != tuple(v.shape)]
    extra = sorted(k for k in stored if k not in model_sd)
    if missing or extra or wrong:
        what = [f"'{k}': checkpoint {a}, model {b}" for k, a, b in wrong[:3]]
        for label, keys in (("missing from the checkpoint", missing), ("not in the model", extra)):
            if keys:
                what.append(f"{label}: {keys[:3]}{' ...' if len(keys) > 3 else ''}")
        raise CheckpointMismatchError(f"checkpoint '{path}' holds another model shape than the one configured: "
                                      + "; ".join(what) + " (same model config as the run that saved it?)")


def load_checkpoint(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load into `model`/`optimizer`/`scheduler` (collective). Returns {"step", "extra"}."""
    path = Path(path)
    validate_checkpoint(path)
    rank = dist.get_rank() if _dist() else 0
    opts = _options(model)
    if optimizer is not None:
        msd, osd = get_state_dict(model, optimizer, options=opts)
        state = {"model": _trainable_only(model, msd), "optim": osd}
    else:
        state = {"model": _trainable_only(model, get_model_state_dict(model, options=opts))}
    _check_shapes(path, state["model"])
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
        raise CheckpointError(f"checkpoint '{path}' could not be read by DCP: {_dcp_cause(e)}") from e
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=opts)
    else:
        set_model_state_dict(model, state["model"], options=opts)
    meta = _torch_load(path / STATE_FILE)
    if scheduler is not None and meta.get("scheduler") is not None:
        scheduler.load_state_dict(meta["scheduler"])
    rng_file = path / f"rng_rank{rank}.pt"
    if restore_rng:
        if rng_file.is_file():
            set_rng_state(_torch_load(rng_file))
        else:
            log.warning("checkpoint '%s' has no RNG state for rank %d (saved with %s ranks); RNG not restored",
                        path, rank, meta.get("world_size"))
    return {"step": int(meta["step"]), "extra": meta.get("extra", {})}


def _torch_load(f: Path) -> Any:
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint file '{f}' is corrupt: {type(e).__name__}: {e}") from e


def resume_latest(root: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                  scheduler: Any = None) -> dict[str, Any] | None:
    """Load the newest loadable checkpoint, falling back to older ones (with a warning) when a
    newer one turns out to be corrupt. None when there is none; when there are some but none
    loads, an error listing why (resuming must never quietly become a fresh start)."""
    failures = []
    for step, path in reversed(list_checkpoints(root)):
        try:
            out = load_checkpoint(path, model, optimizer, scheduler)
            out["path"] = path
            return out
        except CheckpointError as e:
            failures.append(f"step {step}: {e}")
            log.warning("cannot resume from step %d: %s; trying the previous checkpoint", step, e)
    if failures:
        raise CheckpointError(f"none of the {len(failures)} checkpoints in '{root}' can be loaded: "
                              + "; ".join(failures))
    return None
