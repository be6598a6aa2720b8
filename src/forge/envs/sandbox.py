"""Run untrusted Python: `run_python(code, timeout_s=..., memory_mb=...) -> SandboxResult`.

Layers (each one contains what the others might miss):

- **bubblewrap** (`bwrap`, Debian package `bubblewrap`) when present: every namespace unshared
  (no network: only a loopback-less net namespace; own pid namespace), the host root mounted
  read-only, a private tmpfs on /tmp, and one fresh host temp dir bound read-write at
  `/tmp/work` (the working directory). The temp dir is deleted afterwards.
- **rlimits**, set by a tiny launcher *inside* the sandbox just before it execs the user's code
  (setting them before bwrap would cap bwrap itself and, for RLIMIT_NPROC, the whole user
  namespace tree): RLIMIT_AS (memory), RLIMIT_CPU (cpu time), RLIMIT_NPROC (processes),
  RLIMIT_FSIZE (largest file), RLIMIT_CORE=0.
- **a wall-clock kill**: at `timeout_s` the launcher process group is SIGKILLed; bwrap runs with
  `--die-with-parent` and owns the pid namespace, so when it dies the kernel kills every process
  in the namespace — a fork bomb's children cannot outlive the run.
- **a pids cgroup** when the host lets us create one (root with a writable pids controller):
  `pids.max = max_procs` for the whole run. This is what bounds a fork bomb *as root*:
  RLIMIT_NPROC is not enforced for processes whose real uid is host root (also inside a user
  namespace, where the sandbox uid maps back to root). For a non-root user RLIMIT_NPROC counts
  that uid's processes in the sandbox's own user namespace, i.e. per run.

Without bwrap the fallback is `unshare` (net + pid namespace, plus a user namespace for
non-root users) with the same rlimits and wall-clock kill — but the host filesystem is NOT
read-only there; one loud warning says so. `strict=True` (config `sandbox: strict`) refuses to
run without bwrap instead. With no usable `unshare` either, code runs with rlimits only.

Outputs are captured through pipes by reader threads that keep the first `max_output_bytes`
of each stream and discard the rest, so a print loop cannot exhaust host memory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)

WORKDIR = "/tmp/work"  # where the fresh temp dir appears inside a bwrap sandbox
_MARKER_ENV = "FORGE_SANDBOX_RUN"

# Runs inside the sandbox: apply the rlimits, then exec the user's program. argv: limits as ints.
_LAUNCHER = r"""
import os, resource, sys
as_b, cpu, nproc, fsize = (int(x) for x in sys.argv[1:5])
R = resource
def lim(k, v):
    try:
        R.setrlimit(k, (v, v))
    except (ValueError, OSError):
        soft, hard = R.getrlimit(k)
        R.setrlimit(k, (min(v, hard) if hard != R.RLIM_INFINITY else v, hard))
lim(R.RLIMIT_CORE, 0)
lim(R.RLIMIT_FSIZE, fsize)
lim(R.RLIMIT_NPROC, nproc)
R.setrlimit(R.RLIMIT_CPU, (cpu, cpu + 1))  # soft: SIGXCPU, hard one second later: SIGKILL
lim(R.RLIMIT_AS, as_b)
os.execv(sys.executable, [sys.executable, "-I", "-B", *sys.argv[5:]])
"""


def _python_under_tmp(python: str) -> list[str]:
    """`--ro-bind` args that keep the interpreter visible when it lives under /tmp (a venv of a
    checkout in /tmp): the sandbox's /tmp is a fresh tmpfs, which would hide it."""
    tmp = Path("/tmp")
    roots = {Path(python).parent.parent, Path(os.path.realpath(python)).parent.parent,
             Path(sys.prefix), Path(sys.base_prefix)}
    out: list[str] = []
    for r in sorted(roots):
        if tmp in r.parents and r.exists():
            out += ["--ro-bind", str(r), str(r)]
    return out


class SandboxUnavailableError(RuntimeError):
    """Strict mode was asked for but bubblewrap cannot run here."""


@dataclass
class SandboxResult:
    stdout: str
    stderr: str
    exit_code: int
    timed_out: bool = False
    limit_hit: str | None = None  # "time" | "memory" | "cpu" | "procs" | "output" | None
    duration_s: float = 0.0
    isolation: str = "bwrap"  # "bwrap" | "unshare" | "rlimits"
    run_id: str = ""
    truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and self.limit_hit is None


@dataclass
class SandboxConfig:
    """Defaults for `run_python`; a config's `sandbox:` block (or the string "strict")."""

    timeout_s: float = 10.0
    cpu_time_s: float | None = None  # None: same as timeout_s
    memory_mb: int = 512
    max_procs: int = 32
    max_file_mb: int = 16
    max_output_bytes: int = 64_000
    strict: bool = False
    python: str = field(default_factory=lambda: sys.executable)

    @classmethod
    def from_spec(cls, spec: "SandboxConfig | dict | str | None") -> "SandboxConfig":
        if spec is None:
            return cls()
        if isinstance(spec, cls):
            return spec
        if isinstance(spec, str):
            if spec not in ("strict", "fallback", "default"):
                raise ValueError(f"sandbox: expected 'strict', 'fallback' or a mapping, got {spec!r}")
            return cls(strict=spec == "strict")
        if isinstance(spec, dict):
            bad = set(spec) - set(cls.__dataclass_fields__)
            if bad:
                raise ValueError(f"sandbox: unknown keys {sorted(bad)}; known: {sorted(cls.__dataclass_fields__)}")
            return cls(**spec)
        raise TypeError(f"sandbox: expected a mapping, 'strict' or SandboxConfig, got {type(spec).__name__}")


# ---- what isolation this host offers (probed once per process) -----------------------------
@lru_cache(maxsize=1)
def bwrap_available() -> bool:
    exe = shutil.which("bwrap")
    if exe is None:
        return False
    try:  # installed is not enough: user namespaces may be disabled (containers, AppArmor)
        r = subprocess.run([exe, "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "--proc", "/proc",
                            "--dev", "/dev", "true"], capture_output=True, timeout=20)
        if r.returncode != 0:
            log.warning("bwrap is installed but cannot create a sandbox here: %s", r.stderr.decode(errors="replace"))
        return r.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@lru_cache(maxsize=1)
def _unshare_prefix() -> tuple[str, ...]:
    """The strongest `unshare` invocation this host permits ('' tuple: none)."""
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    tries = [] if os.geteuid() == 0 else [[exe, "-r", "-n", "-p", "-f", "--kill-child"]]
    tries += [[exe, "-n", "-p", "-f", "--kill-child"], [exe, "-n"]]
    for cmd in tries:
        try:
            if subprocess.run([*cmd, "true"], capture_output=True, timeout=20).returncode == 0:
                return tuple(cmd)
        except (OSError, subprocess.TimeoutExpired):
            continue
    return ()


_warned = False


def _warn_fallback(prefix: tuple[str, ...]) -> None:
    global _warned
    if _warned:
        return
    _warned = True
    what = ("network + pid namespace via `unshare`" if "-p" in prefix else
            "network namespace via `unshare`" if prefix else "NO namespace isolation (unshare not permitted)")
    log.warning(
        "\n" + "!" * 78 + "\n!! forge sandbox: bubblewrap (`bwrap`) is not usable on this host; untrusted code runs\n"
        f"!! with rlimits + {what}.\n!! The host filesystem is NOT read-only for it. Install the `bubblewrap` package\n"
        "!! (scripts/setup.sh does, when it can) or set `sandbox: strict` to refuse instead.\n" + "!" * 78)


def sandbox_mode(strict: bool = False) -> str:
    """'bwrap', 'unshare' or 'rlimits': what `run_python` would use; raises in strict mode without bwrap."""
    if bwrap_available():
        return "bwrap"
    if strict:
        raise SandboxUnavailableError(
            "sandbox: strict requires bubblewrap (`bwrap`), which is missing or cannot create namespaces here; "
            "install the Debian/Ubuntu package `bubblewrap` (apt-get install -y bubblewrap), or drop "
            "`sandbox: strict` to accept the weaker unshare + rlimits fallback")
    return "unshare" if _unshare_prefix() else "rlimits"


@lru_cache(maxsize=1)
def process_limit_enforced() -> bool:
    """Whether `max_procs` is enforced here: RLIMIT_NPROC for non-root users, a pids cgroup for root.

    When False (root without a writable pids cgroup), a fork bomb is contained only by the pid
    namespace and the wall clock (bwrap / `unshare -p`), not bounded while it runs."""
    if os.geteuid() != 0:
        return True
    cg = _PidsCgroup(8)
    ok = cg.path is not None
    cg.close()
    return ok


# ---- pids cgroup (best effort) ---------------------------------------------------------------
class _PidsCgroup:
    """A fresh pids cgroup (v1 `pids` hierarchy or v2 unified) limiting the whole run."""

    def __init__(self, max_procs: int):
        self.path: Path | None = None
        for root in (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup")):
            if not (root / "cgroup.procs").exists():
                continue
            if root == Path("/sys/fs/cgroup") and "pids" not in _read(root / "cgroup.subtree_control"):
                continue
            p = root / f"forge-sandbox-{uuid.uuid4().hex[:12]}"
            try:
                p.mkdir()
                (p / "pids.max").write_text(str(max_procs))
                self.path = p
                return
            except OSError:
                try:
                    p.rmdir()
                except OSError:
                    pass

    def enter(self) -> None:
        """Called in the child between fork and exec."""
        if self.path is not None:
            (self.path / "cgroup.procs").write_text("0")

    def close(self) -> None:
        if self.path is None:
            return
        for _ in range(50):  # the kernel frees a cgroup only once its last process is reaped
            try:
                self.path.rmdir()
                return
            except OSError:
                for pid in _read(self.path / "cgroup.procs").split():
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except (ProcessLookupError, ValueError):
                        pass
                time.sleep(0.02)
        log.warning("sandbox: could not remove cgroup %s", self.path)


def _read(p: Path) -> str:
    try:
        return p.read_text()
    except OSError:
        return ""


# ---- output capture ------------------------------------------------------------------------
class _Capture(threading.Thread):
    def __init__(self, stream, limit: int):
        super().__init__(daemon=True)
        self.stream, self.limit = stream, limit
        self.buf = bytearray()
        self.dropped = 0

    def run(self) -> None:
        try:
            while chunk := self.stream.read1(65536) if hasattr(self.stream, "read1") else self.stream.read(65536):
                room = self.limit - len(self.buf)
                self.buf += chunk[:max(0, room)]
                self.dropped += max(0, len(chunk) - max(0, room))
        except (OSError, ValueError):
            pass

    def text(self) -> str:
        s = self.buf.decode("utf-8", errors="replace")
        return s + (f"\n... [{self.dropped} bytes truncated]" if self.dropped else "")


def _feed(stream, data: bytes) -> None:
    try:
        stream.write(data)
    except (BrokenPipeError, OSError, ValueError):
        pass
    finally:
        try:
            stream.close()
        except OSError:
            pass


# ---- the entry point -----------------------------------------------------------------------
def run_python(code: str, *, stdin: str | None = None, timeout_s: float | None = None,
               cpu_time_s: float | None = None, memory_mb: int | None = None, max_procs: int | None = None,
               files: dict[str, str | bytes] | None = None, strict: bool | None = None,
               config: SandboxConfig | dict | str | None = None) -> SandboxResult:
    """Run `code` as `python main.py` in a fresh sandbox and return what happened.

    `files` are written next to main.py first (relative paths only). Keyword arguments override
    `config` (a `SandboxConfig`, its dict, or "strict"). Never raises for anything the code does;
    raises ValueError for bad arguments and SandboxUnavailableError in strict mode without bwrap.
    """
    cfg = SandboxConfig.from_spec(config)
    timeout_s = float(cfg.timeout_s if timeout_s is None else timeout_s)
    cpu_time_s = cpu_time_s if cpu_time_s is not None else (cfg.cpu_time_s or timeout_s)
    memory_mb = int(cfg.memory_mb if memory_mb is None else memory_mb)
    max_procs = int(cfg.max_procs if max_procs is None else max_procs)
    strict = cfg.strict if strict is None else strict
    if not isinstance(code, str):
        raise TypeError(f"run_python: code must be a str, got {type(code).__name__}")
    if timeout_s <= 0 or cpu_time_s <= 0 or memory_mb < 32 or max_procs < 1:
        raise ValueError(f"run_python: need timeout_s > 0, cpu_time_s > 0, memory_mb >= 32, max_procs >= 1; got "
                         f"{timeout_s}, {cpu_time_s}, {memory_mb}, {max_procs}")
    mode = sandbox_mode(strict)
    if mode != "bwrap":
        _warn_fallback(_unshare_prefix())

    run_id = uuid.uuid4().hex
    host_dir = Path(tempfile.mkdtemp(prefix="forge-sbx-"))
    cgroup: _PidsCgroup | None = None
    try:
        _write_files(host_dir, code, files or {})
        workdir = WORKDIR if mode == "bwrap" else str(host_dir)
        limits = [str(memory_mb * 2**20), str(max(1, int(round(cpu_time_s)))), str(max_procs),
                  str(cfg.max_file_mb * 2**20)]
        inner = [cfg.python, "-I", "-S", "-c", _LAUNCHER, *limits, "main.py"]
        if mode == "bwrap":
            cmd = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--ro-bind", "/", "/",
                   "--tmpfs", "/tmp", *_python_under_tmp(cfg.python), "--bind", str(host_dir), WORKDIR,
                   "--proc", "/proc", "--dev", "/dev", "--chdir", WORKDIR, "--", *inner]
        else:
            cmd = [*_unshare_prefix(), *inner]
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8",
               "PYTHONIOENCODING": "utf-8", "PYTHONDONTWRITEBYTECODE": "1", _MARKER_ENV: run_id}
        if os.geteuid() == 0:
            cgroup = _PidsCgroup(max_procs + 4)  # + bwrap, its pid-1 reaper, the launcher
        return _execute(cmd, env, workdir if mode != "bwrap" else str(host_dir), stdin, timeout_s, cpu_time_s,
                        cfg.max_output_bytes, cgroup, mode, run_id)
    finally:
        if cgroup is not None:
            cgroup.close()
        shutil.rmtree(host_dir, ignore_errors=True)


async def arun_python(code: str, **kwargs) -> SandboxResult:
    """`run_python` in a worker thread, for async callers (environments, tools)."""
    return await asyncio.to_thread(run_python, code, **kwargs)


def _write_files(d: Path, code: str, files: dict[str, str | bytes]) -> None:
    (d / "main.py").write_text(code)
    for name, content in files.items():
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts or name == "main.py":
            raise ValueError(f"run_python: files must be relative paths inside the sandbox (not main.py), got {name!r}")
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            (d / rel).write_bytes(content)
        else:
            (d / rel).write_text(content)
    if os.geteuid() == 0:
        # bwrap maps the sandbox's uid back to ours, so ownership is fine; world-writable just in
        # case the sandbox runs as another uid (unshare without -r keeps ours too)
        os.chmod(d, 0o777)


def _execute(cmd: list[str], env: dict[str, str], cwd: str, stdin: str | None, timeout_s: float,
             cpu_time_s: float, max_out: int, cgroup: _PidsCgroup | None, mode: str, run_id: str) -> SandboxResult:
    preexec = cgroup.enter if cgroup is not None and cgroup.path is not None else None
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd,
                            env=env, start_new_session=True, preexec_fn=preexec, close_fds=True)
    out, err = _Capture(proc.stdout, max_out), _Capture(proc.stderr, max_out)
    out.start()
    err.start()
    feeder = threading.Thread(target=_feed, args=(proc.stdin, (stdin or "").encode()), daemon=True)
    feeder.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        _kill_group(proc)
        proc.wait()
    duration = time.perf_counter() - t0
    for t in (feeder, out, err):
        t.join(timeout=5)
    for s in (proc.stdout, proc.stderr):
        try:
            s.close()
        except OSError:
            pass
    code = proc.returncode
    # bwrap / unshare report a signalled child as 128 + signal; Popen as -signal
    sig = -code if code < 0 else (code - 128 if code > 128 else 0)
    stderr = err.text()
    if mode == "unshare" and "unshare: sigprocmask unblock failed" in stderr:
        # util-linux unshare could not re-raise its child's fatal signal and exited 1: the child
        # was signalled, which signal is lost (-1: unknown)
        stderr = "".join(ln for ln in stderr.splitlines(True) if not ln.startswith("unshare: sigprocmask"))
        sig = -1
    limit = None
    if timed_out:
        limit = "time"
    elif sig in (signal.SIGXCPU, signal.SIGKILL, -1) and duration >= 0.8 * cpu_time_s:
        limit = "cpu"
    elif "MemoryError" in stderr or "Cannot allocate memory" in stderr:
        limit = "memory"
    elif "BlockingIOError" in stderr or "Resource temporarily unavailable" in stderr:
        limit = "procs"
    elif sig == signal.SIGXFSZ or "File too large" in stderr:
        limit = "file_size"
    return SandboxResult(stdout=out.text(), stderr=stderr, exit_code=code if code >= 0 else 128 - code,
                         timed_out=timed_out, limit_hit=limit, duration_s=duration, isolation=mode, run_id=run_id,
                         truncated=bool(out.dropped or err.dropped))


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher's process group (bwrap/unshare die with it, taking their pid namespace)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def stray_processes(run_id: str) -> list[int]:
    """Pids still alive that belong to sandbox run `run_id` (for tests and health checks)."""
    needle = f"{_MARKER_ENV}={run_id}".encode()
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(pid))
        except OSError:
            continue
    return found


__all__ = ["SandboxConfig", "SandboxResult", "SandboxUnavailableError", "arun_python", "bwrap_available",
           "process_limit_enforced", "run_python", "sandbox_mode", "stray_processes"]
