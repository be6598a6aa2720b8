"""Ownership and cleanup of the weight-sync files in /dev/shm.

Every file the `shm` and `cuda_ipc` publishers write records its owner: host, pid and the pid's
start time (so a reused pid is not mistaken for the owner). A run removes its own files when it
ends, crash or not (`remove_run_files`, from a `finally`); a publisher starting up removes the
files of publishers that died without cleaning up (`remove_stale`): only files named like ours
(`forge_ws_*`, `forge_ipc_*`), owned by this user, on this host, whose owning process is gone.
A file whose owner cannot be read (empty, foreign, garbled) is left alone.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import struct
from pathlib import Path
from typing import Any

from forge.weight_sync.common import WeightSyncError, open_private

log = logging.getLogger(__name__)

PREFIXES = ("forge_ws_", "forge_ipc_")
_MAGIC = b"FORGEWS1"  # the shm weight file's magic (shm.py writes it; a header read needs only this)


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22); None without procfs."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def owner() -> dict[str, Any]:
    """This process as the owner of the files it writes."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _start_time(pid)}


def owner_alive(rec: dict[str, Any]) -> bool:
    """Whether the process that wrote `rec` (an `owner()` record) still runs. Another host's
    files are always treated as alive: we cannot see its processes."""
    if rec.get("host") != socket.gethostname():
        return True
    pid = int(rec["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's: not ours (pid reused)
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return False  # killed, not yet reaped
    except OSError:
        pass
    start = rec.get("start")
    now = _start_time(pid)
    return start is None or now is None or int(start) == now  # a different start time: the pid was reused


def _read_owner(path: Path) -> dict[str, Any] | None:
    """The owner record inside a weight-sync file, or None if it cannot be read."""
    try:
        with open_private(path) as f:
            head = f.read(len(_MAGIC) + 8)
            if head[: len(_MAGIC)] == _MAGIC:  # shm weight file: the owner is in its JSON header
                (n,) = struct.unpack("<Q", head[len(_MAGIC):])
                if n > 1 << 26:
                    return None
                meta = json.loads(f.read(n))
            else:  # .latest pointer or cuda_ipc descriptor: the whole file is JSON
                meta = json.loads(head + f.read())
    except (OSError, ValueError, struct.error, WeightSyncError):
        return None
    rec = meta.get("owner") if isinstance(meta, dict) else None
    return rec if isinstance(rec, dict) and "pid" in rec else None


def _ours(path: Path) -> bool:
    try:
        st = path.lstat()
    except OSError:
        return False
    uid = os.getuid() if hasattr(os, "getuid") else st.st_uid
    return path.is_file() and not path.is_symlink() and st.st_uid == uid


def remove_stale(directory: str | Path) -> list[Path]:
    """Remove weight-sync files in `directory` whose owning process is dead. Returns what was removed."""
    d = Path(directory)
    removed: list[Path] = []
    try:
        candidates = [p for p in d.iterdir() if p.name.startswith(PREFIXES)]
    except OSError:
        return removed
    for p in candidates:
        if not _ours(p):
            continue
        rec = _read_owner(p)
        if rec is None or owner_alive(rec):
            continue
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("cannot remove stale weight-sync file '%s': %s", p, e)
    if removed:
        log.warning("removed %d weight-sync file(s) of dead processes from %s: %s", len(removed), d,
                    ", ".join(sorted(p.name for p in removed)))
    return removed


def run_files(name: str, directory: str | Path) -> list[Path]:
    """Every file the shm / cuda_ipc publishers of run `name` may have left in `directory`."""
    d = Path(directory)
    version_file = re.compile(rf"^forge_ws_{re.escape(name)}_v\d+\.(bin|tmp)$")
    try:
        out = [p for p in d.iterdir() if version_file.match(p.name)]
    except OSError:
        return []
    out += [p for p in (d / f"forge_ws_{name}.latest", d / f"forge_ws_{name}.latest.tmp",
                        d / f"forge_ipc_{name}.json", d / f"forge_ipc_{name}.tmp") if p.exists()]
    return out


def remove_run_files(name: str, directory: str | Path) -> list[Path]:
    """Remove run `name`'s weight-sync files (this user's only); for a `finally` at the end of a run."""
    removed = []
    for p in run_files(name, directory):
        if _ours(p):
            try:
                p.unlink()
                removed.append(p)
            except FileNotFoundError:
                pass
    return removed
