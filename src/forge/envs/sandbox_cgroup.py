"""Whole-run resource limits for `forge.envs.sandbox`: a cgroup (pids + memory) or, without a
memory cgroup, a watchdog that sums the run's resident memory.

`RunCgroup` creates fresh cgroup(s) *under this process's own cgroup* (so the host's limits on us
still apply; else under the hierarchy's root): cgroup v2 (unified at /sys/fs/cgroup: `pids.max`,
`memory.max`, `memory.swap.max = 0`) or the v1 `pids` / `memory` hierarchies (`pids.max`,
`memory.limit_in_bytes`, `memory.memsw.limit_in_bytes`). Processes enter it between fork and
exec (`enter`, a `preexec_fn`). Where nothing can be created (no write access, controller not
delegated) its `pids` / `memory` flags are False and the caller falls back.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

log = logging.getLogger("forge.envs.sandbox")


def _own_cgroups() -> tuple[dict[str, str], str | None]:
    """This process's cgroup path per v1 controller, and its v2 path (None without a v2 line)."""
    v1: dict[str, str] = {}
    v2 = None
    for ln in _read(Path("/proc/self/cgroup")).splitlines():
        parts = ln.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
        for c in parts[1].split(","):
            if c:
                v1[c] = parts[2]
    return v1, v2


class RunCgroup:
    """Fresh cgroup(s) holding every process of one run: `pids.max` and a memory limit (swap off).

    Created under this process's own cgroup (so limits the host puts on us still apply), else
    under the hierarchy's root. cgroup v2 (unified at /sys/fs/cgroup) or v1 `pids` / `memory`
    hierarchies. `pids` / `memory` say what could be set up; either may be False (no write access,
    controller not available or not delegated)."""

    def __init__(self, max_procs: int | None, memory_bytes: int | None):
        self.dirs: list[Path] = []
        self.pids = self.memory = False
        self._events: Path | None = None  # the file whose "oom_kill N" counts memory kills
        name = f"forge-sandbox-{uuid.uuid4().hex[:12]}"
        v1, v2 = _own_cgroups()
        unified = Path("/sys/fs/cgroup")
        if v2 is not None and (unified / "cgroup.controllers").exists():
            self._setup_v2(unified, v2, name, max_procs, memory_bytes)
            return
        for ctl, want in (("pids", max_procs), ("memory", memory_bytes)):
            root = Path("/sys/fs/cgroup") / ctl
            if want is None or ctl not in v1 or not (root / "cgroup.procs").exists():
                continue
            for parent in dict.fromkeys((root / v1[ctl].lstrip("/"), root)):
                d = parent / name
                try:
                    d.mkdir()
                except OSError:
                    continue
                try:
                    if ctl == "pids":
                        (d / "pids.max").write_text(str(want))
                        self.pids = True
                    else:
                        (d / "memory.limit_in_bytes").write_text(str(want))
                        if (d / "memory.memsw.limit_in_bytes").exists():  # swap accounting: no swap either
                            (d / "memory.memsw.limit_in_bytes").write_text(str(want))
                        self.memory, self._events = True, d / "memory.oom_control"
                    self.dirs.append(d)
                    break
                except OSError:
                    _rmdir(d)

    def _setup_v2(self, unified: Path, own: str, name: str, max_procs: int | None, memory_bytes: int | None) -> None:
        wanted = [c for c, v in (("pids", max_procs), ("memory", memory_bytes)) if v is not None]
        for parent in dict.fromkeys((unified / own.lstrip("/"), unified)):
            enabled = _read(parent / "cgroup.subtree_control").split()
            for c in wanted:
                if c not in enabled:
                    try:  # fails where the parent has processes of its own (v2's no-internal-process rule)
                        (parent / "cgroup.subtree_control").write_text(f"+{c}")
                    except OSError:
                        pass
            enabled = _read(parent / "cgroup.subtree_control").split()
            if not any(c in enabled for c in wanted):
                continue
            d = parent / name
            try:
                d.mkdir()
            except OSError:
                continue
            try:
                if "pids" in enabled and max_procs is not None:
                    (d / "pids.max").write_text(str(max_procs))
                    self.pids = True
                if "memory" in enabled and memory_bytes is not None:
                    (d / "memory.max").write_text(str(memory_bytes))
                    if (d / "memory.swap.max").exists():
                        (d / "memory.swap.max").write_text("0")
                    self.memory, self._events = True, d / "memory.events"
                self.dirs.append(d)
                return
            except OSError:
                self.pids = self.memory = False
                _rmdir(d)

    def enter(self) -> None:
        """Called in the child between fork and exec."""
        pid = str(os.getpid())
        for d in self.dirs:
            (d / "cgroup.procs").write_text(pid)

    def oom_kills(self) -> int:
        if self._events is None:
            return 0
        for ln in _read(self._events).splitlines():
            k, _, v = ln.partition(" ")
            if k == "oom_kill" and v.strip().isdigit():
                return int(v)
        return 0

    def kill_all(self) -> None:
        for d in self.dirs:
            for pid in _read(d / "cgroup.procs").split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass

    def close(self) -> None:
        for d in self.dirs:
            for i in range(120):  # the kernel frees a cgroup only once its last process is reaped
                if _rmdir(d):
                    break
                self.kill_all()
                time.sleep(min(0.001 * 2**i, 0.02))  # usually gone within a few ms
            else:
                log.warning("sandbox: could not remove cgroup %s", d)
        self.dirs = []


def _rmdir(d: Path) -> bool:
    try:
        d.rmdir()
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


def _read(p: Path) -> str:
    try:
        return p.read_text()
    except OSError:
        return ""


def _descendants(root_pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root_pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


class MemoryWatchdog(threading.Thread):
    """Sums the resident memory of a run's process tree; SIGKILLs the run above the limit."""

    def __init__(self, proc: subprocess.Popen, limit_bytes: int):
        super().__init__(daemon=True)
        self.proc, self.limit = proc, limit_bytes
        self.stop = threading.Event()
        self.fired = False

    def run(self) -> None:
        while not self.stop.wait(0.02):
            if sum(_rss_bytes(p) for p in _descendants(self.proc.pid)) > self.limit:
                self.fired = True
                try:  # the launcher's process group: the wrapper, and with it its pid namespace
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                return


__all__ = ["MemoryWatchdog", "RunCgroup"]
