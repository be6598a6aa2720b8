"""Run untrusted Python: `run_python(code, timeout_s=..., memory_mb=...) -> SandboxResult`.

Layers (each one contains what the others might miss):

- **bubblewrap** (`bwrap`, Debian package `bubblewrap`) when present: every namespace unshared
  (network: a loopback-less net namespace, so no TCP to the host and no abstract unix sockets;
  own pid namespace; own user namespace with an unprivileged uid/gid 65534 inside, no
  capabilities — where the host refuses user namespaces, bwrap without one: the caller's uid,
  capabilities dropped, warned). The root is a fresh tmpfs holding only what the interpreter
  needs, read-only: /usr, /bin, /sbin, /lib* (as the host has them: dirs or merged-/usr symlinks), a few /etc
  files (ld.so.cache, ld.so.conf*, localtime, alternatives; a generated passwd/group naming the
  sandbox user), the interpreter's own prefixes (venv, base prefix from pyvenv.cfg `home`, exec
  prefixes), every directory of a shared library it maps at start-up, and each hop of the
  interpreter path's symlink chain. Nothing else of the host: no /root, /home, /etc/shadow,
  /run, /var, host /tmp (so no host unix sockets), no project checkout unless the interpreter
  lives in it. /tmp and /dev/shm are private tmpfs of bounded size (`tmp_mb`); one fresh host
  temp dir is bound read-write at `/tmp/work` (the working directory) and deleted afterwards.
- **rlimits**, set by a tiny launcher *inside* the sandbox just before it execs the user's code
  (setting them before bwrap would cap bwrap itself and, for RLIMIT_NPROC, the whole user
  namespace tree): RLIMIT_AS (memory, per process), RLIMIT_CPU (cpu time), RLIMIT_NPROC
  (processes), RLIMIT_FSIZE (largest file), RLIMIT_CORE=0.
- **a cgroup for the whole run** (`forge.envs.sandbox_cgroup`) when the host lets us create one
  (root, or a delegated subtree; v2 unified or v1 `pids`/`memory` hierarchies, created *under
  this process's own cgroup* so the host's limits on us still apply): `pids.max = max_procs`
  and a memory limit of `memory_mb` for all the run's processes together (plus its tmpfs pages), swap off. This is
  what bounds a fork bomb as root (RLIMIT_NPROC is not enforced for host root, also inside a
  user namespace mapped to it) and what makes `memory_mb` a total, not a per-process figure.
  Without a memory cgroup a watchdog thread sums the resident memory of the run's processes
  every 20 ms and kills the run above `memory_mb` (best effort: a single allocation between two
  samples is still capped per process by RLIMIT_AS).
- **a wall-clock kill**: at `timeout_s` (counted from the moment the user's program starts) the
  launcher process group is SIGKILLed; bwrap runs with `--die-with-parent` and owns the pid
  namespace, so when it dies the kernel kills every process in the namespace; the cgroup's
  remaining processes are killed too. Nothing the program starts outlives the call.

**Infrastructure failures raise `forge.errors.InfraError`**, never a result that looks like a
wrong answer: an interpreter that does not run on the host (missing, broken symlink), a bwrap
that cannot build the sandbox or cannot exec the interpreter inside, a launcher that fails before
the user's program starts, or a sandbox that does not start within `start_timeout_s`. The
launcher signals "started" on a close-on-exec pipe just before it execs the user's program, so
whatever the program does afterwards (exit 1, crash, delete files) is the program's result.

Without bwrap the fallback is `unshare` (net + pid namespace, and a user namespace mapping us to
uid 65534 inside when permitted) with the same rlimits, cgroup limits and wall-clock kill — but
the host filesystem is NOT hidden or read-only there (the inside uid maps back to the caller, so
the caller's files are as writable as for the caller, minus capabilities); one loud warning says
so. `strict=True` (config `sandbox: strict`) refuses to run without bwrap instead. With no usable
`unshare` either, code runs with rlimits and cgroups only, as the caller's uid.

Outputs are captured through pipes by reader threads that keep the first `max_output_bytes`
of each stream and discard the rest, so a print loop cannot exhaust host memory.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
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

from forge.envs.sandbox_cgroup import MemoryWatchdog, RunCgroup
from forge.errors import InfraError

log = logging.getLogger(__name__)

WORKDIR = "/tmp/work"  # where the fresh temp dir appears inside a bwrap sandbox
SANDBOX_UID = SANDBOX_GID = 65534  # "nobody": the uid/gid the user's code runs as inside
_MARKER_ENV = "FORGE_SANDBOX_RUN"
_PATH = "/usr/local/bin:/usr/bin:/bin"

# Runs inside the sandbox: apply the rlimits, tell the host "started" on the pipe fd (argv[1]),
# then exec the user's program. The fd is close-on-exec, so the program never holds it.
_LAUNCHER = r"""
import os, resource, sys
fd = int(sys.argv[1])
as_b, cpu, nproc, fsize = (int(x) for x in sys.argv[2:6])
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
os.set_inheritable(fd, False)
os.write(fd, b"S")
try:
    os.execv(sys.executable, [sys.executable, "-I", "-B", *sys.argv[6:]])
except OSError as e:
    os.write(fd, ("E" + f"execv {sys.executable}: {e}").encode())
    os._exit(127)
"""

# Runs on the host with the configured interpreter: what it needs to be visible in the sandbox.
_PROBE = r"""
import json, sys
maps = set()
try:
    with open("/proc/self/maps") as f:
        for ln in f:
            parts = ln.split(None, 5)
            if len(parts) == 6 and parts[5].startswith("/"):
                maps.add(parts[5].rstrip("\n").removesuffix(" (deleted)"))
except OSError:
    pass
print(json.dumps({"executable": sys.executable, "maps": sorted(maps),
                  "prefixes": [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]}))
"""

# System paths every interpreter may need (bound read-only, or recreated as the host's symlink).
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "alternatives")
# never bound, whatever the interpreter's layout claims: these paths exactly, and anything under these
_NEVER = ("/", "/tmp", "/root", "/home", "/var", "/etc", "/run")
_NEVER_UNDER = ("/proc", "/sys", "/dev", "/run", "/var/run", "/etc")


class SandboxUnavailableError(RuntimeError):
    """Strict mode was asked for but bubblewrap cannot run here."""


@dataclass
class SandboxResult:
    stdout: str
    stderr: str
    exit_code: int
    timed_out: bool = False
    limit_hit: str | None = None  # "time" | "memory" | "cpu" | "procs" | "file_size" | None
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
    memory_mb: int = 512  # total for all the run's processes (cgroup or watchdog) and per process (RLIMIT_AS)
    max_procs: int = 32
    max_file_mb: int = 16
    tmp_mb: int = 64  # size of each private tmpfs (/tmp, /dev/shm) inside a bwrap sandbox
    max_output_bytes: int = 64_000
    start_timeout_s: float = 30.0  # sandbox + interpreter start-up; past it: InfraError
    strict: bool = False
    python: str = field(default_factory=lambda: sys.executable)

    @classmethod
    def from_spec(cls, spec: SandboxConfig | dict | str | None) -> SandboxConfig:
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
_USERNS = ["--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_GID)]


@lru_cache(maxsize=1)
def _bwrap_user_args() -> tuple[str, ...] | None:
    """bwrap's user-namespace arguments on this host: the unprivileged uid inside when user
    namespaces work, () when only bwrap without one works (root in some containers: uid 0 inside,
    no capabilities, host still hidden; warned), None when bwrap cannot build a sandbox at all."""
    exe = shutil.which("bwrap")
    if exe is None:
        return None
    err = ""
    for user in (_USERNS, []):  # installed is not enough: user namespaces may be disabled (containers, AppArmor)
        try:
            r = subprocess.run([exe, "--unshare-all", *user, "--die-with-parent", "--cap-drop", "ALL",
                                *_system_mounts(), "--proc", "/proc", "--dev", "/dev", "true"],
                               capture_output=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired) as e:
            err = str(e)
            continue
        if r.returncode == 0:
            if not user:
                log.warning("sandbox: bwrap cannot create a user namespace here (%s); sandboxed code runs as uid %d "
                            "without capabilities, host filesystem still hidden", err.strip(), os.geteuid())
            return tuple(user)
        err = r.stderr.decode(errors="replace")
    log.warning("bwrap is installed but cannot create a sandbox here: %s", err)
    return None


def bwrap_available() -> bool:
    return _bwrap_user_args() is not None


@lru_cache(maxsize=1)
def _unshare_prefix() -> tuple[str, ...]:
    """The strongest `unshare` invocation this host permits ('' tuple: none)."""
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    # a user namespace with an unprivileged uid inside first (no capabilities on the host), then
    # without one (root may be refused user namespaces in some containers)
    nobody = [f"--map-user={SANDBOX_UID}", f"--map-group={SANDBOX_GID}"]
    tries = [[exe, *nobody, "-n", "-p", "-f", "--kill-child"], [exe, "-n", "-p", "-f", "--kill-child"],
             [exe, "-n"]]
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
        f"!! with rlimits + cgroup limits + {what}.\n!! The host filesystem is NOT hidden and NOT read-only for "
        "it. Install the `bubblewrap` package\n"
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
    cg = RunCgroup(8, None)
    ok = cg.pids
    cg.close()
    return ok


@lru_cache(maxsize=1)
def memory_limit_mechanism() -> str:
    """How `memory_mb` bounds a run's total here: 'cgroup' (memory.max / memory.limit_in_bytes,
    enforced by the kernel) or 'watchdog' (resident memory sampled every 20 ms, best effort)."""
    cg = RunCgroup(None, 64 * 2**20)
    ok = cg.memory
    cg.close()
    return "cgroup" if ok else "watchdog"


# ---- the interpreter and the filesystem it needs ------------------------------------------
@dataclass(frozen=True)
class _Interpreter:
    path: str  # absolute, unresolved: the venv is found from it
    roots: tuple[str, ...]  # paths (as the interpreter sees them) that must exist inside


def _symlink_chain(path: str) -> list[str]:
    """`path`, then every hop its symlinks lead through (absolute, unresolved), to the real file."""
    hops, seen = [path], {path}
    cur = path
    for _ in range(40):
        if not os.path.islink(cur):
            break
        nxt = os.path.normpath(os.path.join(os.path.dirname(cur), os.readlink(cur)))
        if nxt in seen:
            break
        hops.append(nxt)
        seen.add(nxt)
        cur = nxt
    return hops


@lru_cache(maxsize=16)
def _interpreter(python: str) -> _Interpreter:
    """Run `python` on the host once and collect what it needs; InfraError when it cannot run."""
    exe = python if os.path.isabs(python) else shutil.which(python, path=_PATH)
    if exe is None:
        raise InfraError(f"sandbox: interpreter {python!r} not found (not an absolute path, not on {_PATH})")
    exe = os.path.normpath(exe)
    real = os.path.realpath(exe)
    if not os.path.isfile(real) or not os.access(real, os.X_OK):
        raise InfraError(f"sandbox: interpreter {exe!r} resolves to {real!r}, which is not an executable file "
                         f"(symlink chain: {' -> '.join(_symlink_chain(exe))})")
    err = b""
    try:
        r = subprocess.run([exe, "-I", "-c", _PROBE], capture_output=True, timeout=60,
                           env={"PATH": _PATH, "LANG": "C.UTF-8"})
        err = r.stderr
        info = json.loads(r.stdout)
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError, ValueError) as e:
        raise InfraError(f"sandbox: interpreter {exe!r} (real path {real!r}) does not run on the host: "
                         f"{type(e).__name__}: {e}; stderr: {err.decode(errors='replace')[-2000:]}") from e
    roots = [os.path.dirname(h) for h in _symlink_chain(exe)]  # every hop of bin/python -> ... -> python3.11
    roots += [p for p in info["prefixes"] if p]
    # shared libraries mapped at start-up (libpython, libc, ...) outside the prefixes
    roots += [os.path.dirname(m) for m in info["maps"] if os.path.exists(m)]
    return _Interpreter(exe, tuple(dict.fromkeys(os.path.normpath(r) for r in roots)))


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _system_mounts() -> list[str]:
    out: list[str] = []
    for d in _SYSTEM_DIRS:
        if os.path.islink(d):
            out += ["--symlink", os.readlink(d), d]  # merged /usr: /lib -> usr/lib
        elif os.path.isdir(d):
            out += ["--ro-bind", d, d]
    for f in _ETC_FILES:
        if os.path.lexists(f"/etc/{f}"):
            out += ["--ro-bind-try", f"/etc/{f}", f"/etc/{f}"]
    return out


def _visible_by_system(path: str) -> bool:
    """Whether `path` already resolves to the same place inside through the system mounts alone
    (both it and its real path lie under /usr, /lib, ... — /lib may be the host's usr/lib symlink)."""
    real = os.path.realpath(path)
    return (any(_under(path, d) for d in _SYSTEM_DIRS if os.path.lexists(d))
            and any(_under(real, os.path.realpath(d)) for d in _SYSTEM_DIRS if os.path.isdir(d)))


def _interpreter_mounts(interp: _Interpreter) -> list[str]:
    """`--ro-bind real dest` for each root (at its real path and, when a symlink leads there, at the
    path the interpreter uses), parents before children, skipping what a parent bind already shows.
    InfraError when the interpreter needs a path the sandbox never exposes (/, /etc, a whole home)."""
    binds: dict[str, str] = {}  # dest -> src
    for root in interp.roots:
        if not os.path.exists(root) or _visible_by_system(root):
            continue
        real = os.path.realpath(root)
        for dest in dict.fromkeys((real, root)):
            if dest in _NEVER or any(_under(dest, n) for n in _NEVER_UNDER):
                raise InfraError(f"sandbox: interpreter {interp.path!r} needs {dest!r} (from {root!r}), which the "
                                 f"sandbox never exposes ({', '.join(_NEVER + _NEVER_UNDER)}); use an interpreter "
                                 "installed under /usr, /opt, a venv dir or the like")
            binds[dest] = real
    out: list[str] = []
    kept: dict[str, str] = {}
    for dest in sorted(binds, key=lambda d: (d.count("/"), d)):
        src = binds[dest]
        parent = next((p for p in kept if _under(dest, p)), None)
        if parent is not None and os.path.join(kept[parent], os.path.relpath(dest, parent)) == src:
            continue  # already visible through its parent's bind
        kept[dest] = src
        out += ["--ro-bind", src, dest]
    return out


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
    raises ValueError for bad arguments, SandboxUnavailableError in strict mode without bwrap, and
    `forge.errors.InfraError` (with the cause: the path, bwrap's stderr) when the sandbox or the
    interpreter cannot start — never a result that would read as the code's failure.
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
    if cfg.tmp_mb < 1 or cfg.start_timeout_s <= 0:
        raise ValueError(f"sandbox: need tmp_mb >= 1 and start_timeout_s > 0; got {cfg.tmp_mb}, {cfg.start_timeout_s}")
    mode = sandbox_mode(strict)
    if mode != "bwrap":
        _warn_fallback(_unshare_prefix())
    interp = _interpreter(cfg.python)

    run_id = uuid.uuid4().hex
    host_dir = Path(tempfile.mkdtemp(prefix="forge-sbx-"))
    work = host_dir / "work"
    work.mkdir()
    cgroup: RunCgroup | None = None
    try:
        _write_files(work, code, files or {})
        workdir = WORKDIR if mode == "bwrap" else str(work)
        limits = [str(memory_mb * 2**20), str(max(1, int(round(cpu_time_s)))), str(max_procs),
                  str(cfg.max_file_mb * 2**20)]
        if mode == "bwrap":
            wrapper = ["bwrap", *_bwrap_args(interp, host_dir, cfg.tmp_mb), "--"]
        else:
            wrapper = [*_unshare_prefix()]
        env = {"PATH": _PATH, "HOME": workdir, "LANG": "C.UTF-8", "USER": "sandbox",
               "PYTHONIOENCODING": "utf-8", "PYTHONDONTWRITEBYTECODE": "1", _MARKER_ENV: run_id}
        # max_procs counts the user's processes (main.py included); the cgroup also holds the
        # wrapper: bwrap + its pid-1 reaper, or unshare. The memory limit counts tmpfs pages too.
        wrappers = {"bwrap": 2, "unshare": 1, "rlimits": 0}[mode]
        cgroup = RunCgroup(max_procs + wrappers if os.geteuid() == 0 else None, memory_mb * 2**20)
        start_r, start_w = os.pipe()  # _execute owns (and closes) both ends from here
        cmd = [*wrapper, interp.path, "-I", "-S", "-c", _LAUNCHER, str(start_w), *limits, "main.py"]
        return _execute(cmd, env, str(work), stdin, timeout_s, cpu_time_s, cfg, memory_mb, cgroup, mode, run_id,
                        (start_r, start_w), interp.path)
    finally:
        if cgroup is not None:
            cgroup.close()
        shutil.rmtree(host_dir, ignore_errors=True)


def _bwrap_args(interp: _Interpreter, host_dir: Path, tmp_mb: int) -> list[str]:
    (host_dir / "passwd").write_text(f"sandbox:x:{SANDBOX_UID}:{SANDBOX_GID}:sandbox:{WORKDIR}:/bin/false\n")
    (host_dir / "group").write_text(f"sandbox:x:{SANDBOX_GID}:\n")
    size = str(tmp_mb * 2**20)
    return ["--unshare-all", *(_bwrap_user_args() or ()),
            "--die-with-parent", "--new-session", "--hostname", "sandbox", "--cap-drop", "ALL",
            *_system_mounts(),
            "--ro-bind", str(host_dir / "passwd"), "/etc/passwd", "--ro-bind", str(host_dir / "group"), "/etc/group",
            "--proc", "/proc", "--dev", "/dev", "--size", size, "--tmpfs", "/dev/shm",
            "--size", size, "--tmpfs", "/tmp",
            *_interpreter_mounts(interp),  # after /tmp's tmpfs: an interpreter under /tmp stays visible
            "--bind", str(host_dir / "work"), WORKDIR, "--chdir", WORKDIR]


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


def _wait_started(fd: int, deadline: float) -> bytes:
    """The launcher's first byte on the start pipe: b"S" once the user's program is about to start;
    b"" when the sandbox died first (EOF: every write end is gone) or `deadline` passed."""
    while (left := deadline - time.perf_counter()) > 0:
        if select.select([fd], [], [], min(left, 0.5))[0]:
            return os.read(fd, 1)
    return b""


def _execute(cmd: list[str], env: dict[str, str], cwd: str, stdin: str | None, timeout_s: float,
             cpu_time_s: float, cfg: SandboxConfig, memory_mb: int, cgroup: RunCgroup, mode: str, run_id: str,
             start_pipe: tuple[int, int], python: str) -> SandboxResult:
    start_r, start_w = start_pipe
    preexec = cgroup.enter if cgroup.dirs else None
    t0 = time.perf_counter()
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=cwd, env=env, start_new_session=True, preexec_fn=preexec, close_fds=True,
                                pass_fds=(start_w,))
    except OSError as e:
        os.close(start_r)
        os.close(start_w)
        raise InfraError(f"sandbox: cannot start {cmd[0]!r}: {e}") from e
    os.close(start_w)  # the sandbox holds the only write ends now: EOF means it is gone
    out, err = _Capture(proc.stdout, cfg.max_output_bytes), _Capture(proc.stderr, cfg.max_output_bytes)
    out.start()
    err.start()
    feeder = threading.Thread(target=_feed, args=(proc.stdin, (stdin or "").encode()), daemon=True)
    feeder.start()
    watchdog = None if cgroup.memory else MemoryWatchdog(proc, memory_mb * 2**20)
    if watchdog is not None:
        watchdog.start()
    timed_out = False
    try:
        started = _wait_started(start_r, t0 + cfg.start_timeout_s) == b"S"
        start_timed_out = not started and proc.poll() is None
        t_start = time.perf_counter()
        if started:
            timed_out = not _wait_exit(proc, timeout_s)
    finally:
        _kill_group(proc)
        proc.wait()
        cgroup.kill_all()  # a daemon that left the process group and the namespace's reach
        if watchdog is not None:
            watchdog.stop.set()
    duration = time.perf_counter() - t_start
    for t in (feeder, out, err):
        t.join(timeout=5)
    for s in (proc.stdout, proc.stderr):
        try:
            s.close()
        except OSError:
            pass
    late = _drain(start_r)
    stderr = err.text()
    if not started or late.startswith(b"E"):
        why = (late[1:].decode(errors="replace") if late.startswith(b"E") else
               f"did not start within start_timeout_s={cfg.start_timeout_s}s" if start_timed_out
               else f"exited {proc.returncode} before the program started")
        raise InfraError(f"sandbox ({mode}) could not start the interpreter {python!r} "
                         f"(real path {os.path.realpath(python)!r}): {why}; "
                         f"stderr: {stderr[-2000:].strip() or '(empty)'}")
    code = proc.returncode
    # bwrap / unshare report a signalled child as 128 + signal; Popen as -signal
    sig = -code if code < 0 else (code - 128 if code > 128 else 0)
    if mode == "unshare" and "unshare: sigprocmask unblock failed" in stderr:
        # util-linux unshare could not re-raise its child's fatal signal and exited 1: the child
        # was signalled, which signal is lost (-1: unknown)
        stderr = "".join(ln for ln in stderr.splitlines(True) if not ln.startswith("unshare: sigprocmask"))
        sig = -1
    limit = None
    if timed_out:
        limit = "time"
    elif cgroup.oom_kills() or (watchdog is not None and watchdog.fired):
        limit = "memory"
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


def _wait_exit(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Whether `proc` exited within `timeout_s`. A pidfd wakes us the moment it exits
    (Popen.wait(timeout) polls with sleeps of up to 50 ms, a third of a short run)."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            proc.wait(timeout=timeout_s)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        return bool(select.select([pidfd], [], [], timeout_s)[0])
    finally:
        os.close(pidfd)


def _drain(fd: int) -> bytes:
    """Whatever is left in the start pipe (its writers are gone: the sandbox exited), then close it."""
    data = b""
    try:
        os.set_blocking(fd, False)
        while chunk := os.read(fd, 4096):
            data += chunk
    except (BlockingIOError, OSError):
        pass
    finally:
        os.close(fd)
    return data


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


__all__ = ["SANDBOX_UID", "SandboxConfig", "SandboxResult", "SandboxUnavailableError", "arun_python",
           "bwrap_available", "memory_limit_mechanism", "process_limit_enforced", "run_python", "sandbox_mode",
           "stray_processes"]
