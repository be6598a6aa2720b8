"""Escape attempts against the sandbox: each one fails, stopped by the limit named in its test.

Run as root in CI (like the reward workers): the sandbox must hide the host even then. The
fallback (`unshare`, when bwrap is missing) is checked too for what it promises (network, pid
namespace, unprivileged uid, cgroup limits); it does not hide the host filesystem (documented).
"""

from __future__ import annotations

import json
import os
import resource
import socket
import sys
import tempfile
import threading
import time
import uuid

import pytest

from forge.envs import sandbox
from forge.envs.sandbox import run_python, sandbox_mode, stray_processes

BWRAP = sandbox.bwrap_available()
needs_bwrap = pytest.mark.skipif(not BWRAP, reason="hiding the host filesystem needs bubblewrap (`bwrap`); "
                                 "install the `bubblewrap` package")
needs_memory_cgroup = pytest.mark.skipif(
    sandbox.memory_limit_mechanism() != "cgroup",
    reason="no writable memory cgroup here (cgroup v2 memory controller not delegated / v1 memory hierarchy not "
           "writable): the total is bounded by the RSS watchdog instead, tested separately")


def _unshare_ok() -> bool:
    try:
        return bool(sandbox._unshare_prefix()) and "-p" in sandbox._unshare_prefix()
    except Exception:  # noqa: BLE001
        return False


# the modes each guarantee is checked under: bwrap, and the unshare fallback (bwrap made unavailable)
MODES = [pytest.param("bwrap", marks=needs_bwrap),
         pytest.param("unshare", marks=pytest.mark.skipif(not _unshare_ok(), reason="`unshare -n -p` not permitted"))]


@pytest.fixture
def mode(request, monkeypatch):
    if request.param == "unshare":
        monkeypatch.setattr(sandbox, "bwrap_available", lambda: False)
    assert sandbox_mode() == request.param
    return request.param


def _run_json(code: str, **kw) -> dict:
    r = run_python(code + "\nimport json as _j\nprint(_j.dumps(out))", timeout_s=kw.pop("timeout_s", 20), **kw)
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---- the host filesystem ---------------------------------------------------------------------
@needs_bwrap
def test_host_secrets_and_homes_are_not_visible():
    secret_dir = tempfile.mkdtemp(prefix="forge-secret-", dir="/var/tmp")  # not under /tmp: the old root bind showed it
    secret = os.path.join(secret_dir, f"token-{uuid.uuid4().hex}")
    with open(secret, "w") as f:
        f.write("hunter2")
    probe = [secret, "/etc/shadow", "/etc/gshadow", "/etc/sudoers", os.path.abspath(__file__)]
    try:
        out = _run_json(
            "import os\n"
            "out = {}\n"
            f"for p in {probe!r}:\n"
            "    try:\n"
            "        open(p).read(1); out[p] = 'READ'\n"
            "    except OSError as e:\n"
            "        out[p] = e.errno\n"
            "for d in ('/root', '/home', '/run', '/var', '/etc', '/'):\n"
            "    try:\n"
            "        out['ls ' + d] = sorted(os.listdir(d))\n"
            "    except OSError as e:\n"
            "        out['ls ' + d] = e.errno\n")
    finally:
        os.remove(secret)
        os.rmdir(secret_dir)
    for p in probe:
        if p == os.path.abspath(__file__) and any(os.path.realpath(p).startswith(os.path.realpath(x) + "/")
                                                  for x in (sys.prefix, sys.base_prefix)):
            continue  # a checkout inside the interpreter's own prefix is visible by construction
        assert out[p] != "READ", f"{p} is readable inside the sandbox"
    # /root holds at most the path down to the interpreter's base prefix (pyenv: /root/.pyenv)
    needed = {os.path.relpath(x, "/root").split("/")[0] for x in (sys.prefix, sys.base_prefix)
              if x.startswith("/root/")}
    assert out["ls /root"] == 2 or set(out["ls /root"]) <= needed, out["ls /root"]
    host_home = os.listdir("/home") if os.path.isdir("/home") else []
    assert out["ls /home"] == 2 or not set(out["ls /home"]) & set(host_home)
    assert out["ls /run"] == 2 and out["ls /var"] == 2  # ENOENT: no host sockets, no /var/run
    assert "shadow" not in out["ls /etc"] and set(out["ls /etc"]) <= {*sandbox._ETC_FILES, "passwd", "group"}


@needs_bwrap
def test_writes_outside_the_work_dir_fail(tmp_path):
    targets = [str(tmp_path / "escaped.txt"), os.path.join(sys.prefix, "escaped.txt"), "/etc/passwd",
               "/usr/forge_escape", os.path.join(os.path.realpath(sys.base_prefix), "forge_escape")]
    before = open("/etc/passwd").read()
    out = _run_json("import os\nout = {}\n"
                    f"for p in {targets!r}:\n"
                    "    try:\n"
                    "        with open(p, 'a') as f:\n"
                    "            f.write('x')\n"
                    "        out[p] = 'WROTE'\n"
                    "    except OSError as e:\n"
                    "        out[p] = e.errno\n"
                    "open('/tmp/work/inside.txt', 'w').write('ok')\n"
                    "out['inside'] = open('inside.txt').read()\n")
    assert out["inside"] == "ok"
    for p in targets[1:]:
        assert out[p] != "WROTE", f"wrote {p}"
    assert not (tmp_path / "escaped.txt").exists()  # the sandbox's /tmp is its own tmpfs
    assert not os.path.exists(targets[1]) and not os.path.exists(targets[4]) and not os.path.exists(targets[3])
    assert open("/etc/passwd").read() == before


@needs_bwrap
def test_tmpfs_is_bounded():
    r = run_python("import os\nn = 0\ntry:\n    with open('/tmp/fill', 'wb') as f:\n"
                   "        for _ in range(64):\n            f.write(b'x' * 2**20); f.flush(); n += 1\n"
                   "except OSError as e:\n    print('stopped', n, e.errno)\n",
                   timeout_s=20, memory_mb=512, config={"tmp_mb": 8, "max_file_mb": 1024})
    assert r.stdout.startswith("stopped"), r.stdout + r.stderr
    n, errno = map(int, r.stdout.split()[1:])
    assert n <= 8 and errno == 28  # ENOSPC at the tmpfs size


# ---- sockets ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES, indirect=True)
def test_host_sockets_are_unreachable(mode, tmp_path):
    listeners, paths = [], []
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(4)
    listeners.append(tcp)
    var_dir = tempfile.mkdtemp(prefix="forge-sock-", dir="/var/tmp")
    for d in (str(tmp_path), var_dir):
        s = socket.socket(socket.AF_UNIX)
        s.bind(os.path.join(d, "s.sock"))
        s.listen(4)
        listeners.append(s)
        paths.append(os.path.join(d, "s.sock"))
    abstract = f"\0forge-test-{uuid.uuid4().hex}"
    s = socket.socket(socket.AF_UNIX)
    s.bind(abstract)
    s.listen(4)
    listeners.append(s)
    accepted = []

    def accept_all(srv):
        srv.settimeout(0.2)
        while srv.fileno() != -1:
            try:
                accepted.append(srv.accept()[0])
            except OSError:
                if srv.fileno() == -1:
                    return

    threads = [threading.Thread(target=accept_all, args=(x,), daemon=True) for x in listeners]
    for t in threads:
        t.start()
    try:
        targets = [("tcp", "127.0.0.1", tcp.getsockname()[1])] + [("unix", p, 0) for p in paths] + \
                  [("unix", abstract, 0)]
        out = _run_json("import socket\nout = []\n"
                        f"for kind, addr, port in {targets!r}:\n"
                        "    try:\n"
                        "        if kind == 'tcp':\n"
                        "            socket.create_connection((addr, port), timeout=2)\n"
                        "        else:\n"
                        "            c = socket.socket(socket.AF_UNIX); c.settimeout(2); c.connect(addr)\n"
                        "        out.append('CONNECTED')\n"
                        "    except OSError as e:\n"
                        "        out.append(type(e).__name__)\n")
        time.sleep(0.3)
        if mode == "unshare":
            # the fallback shares the host filesystem: a socket file reachable by path is connectable
            out = [o for o, t in zip(out, targets) if not (t[0] == "unix" and not t[1].startswith("\0"))]
        assert "CONNECTED" not in out and len(out) >= 2, out
        assert accepted == [] or mode == "unshare"
    finally:
        for x in listeners:
            x.close()
        for p in paths:
            os.remove(p)
        os.rmdir(var_dir)


# ---- who the code runs as ---------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES, indirect=True)
def test_uid_inside_is_unprivileged(mode):
    out = _run_json("import os\nout = {'uid': os.getuid(), 'euid': os.geteuid(), 'gid': os.getgid()}\n"
                    "for ln in open('/proc/self/status'):\n"
                    "    if ln.startswith(('CapEff', 'CapPrm')):\n"
                    "        out[ln.split(':')[0]] = int(ln.split()[1], 16)\n")
    if mode == "unshare" and "--map-user=65534" not in " ".join(sandbox._unshare_prefix()):
        pytest.skip("this unshare cannot map to an unprivileged uid (no user namespaces)")
    if mode == "bwrap" and not sandbox._bwrap_user_args():
        pytest.skip("bwrap cannot create a user namespace here: uid inside is the caller's (capabilities dropped)")
    assert out["uid"] == out["euid"] == sandbox.SANDBOX_UID != 0 and out["gid"] == sandbox.SANDBOX_GID
    assert out["CapEff"] == 0 and out["CapPrm"] == 0


@needs_bwrap
def test_bwrap_without_a_user_namespace_still_hides_the_host(monkeypatch):
    # hosts where bwrap works only without --unshare-user: the uid stays, capabilities go, host stays hidden
    monkeypatch.setattr(sandbox, "_bwrap_user_args", lambda: ())
    out = _run_json("import os\nout = {'uid': os.getuid(), 'shadow': os.path.exists('/etc/shadow'),\n"
                    "       'root': sorted(os.listdir('/root')) if os.path.isdir('/root') else []}\n"
                    "for ln in open('/proc/self/status'):\n"
                    "    if ln.startswith('CapEff'):\n"
                    "        out['CapEff'] = int(ln.split()[1], 16)\n")
    assert out["uid"] == os.geteuid() and out["CapEff"] == 0 and not out["shadow"]
    assert set(out["root"]) <= {os.path.relpath(p, "/root").split("/")[0]
                                for p in (sys.prefix, sys.base_prefix) if p.startswith("/root/")}


# ---- resources ----------------------------------------------------------------------------------
_SIX_X_400 = """
import os, sys, time
kids = []
for i in range(6):
    pid = os.fork()
    if pid == 0:
        b = bytearray(b'x') * (400 * 2**20)   # written, so resident
        print('held', i, flush=True)
        time.sleep(2)  # long enough for all six to overlap
        os._exit(0)
    kids.append(pid)
codes = [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in kids]
print('codes', codes, flush=True)
"""


@needs_memory_cgroup
@pytest.mark.parametrize("mode", MODES, indirect=True)
def test_memory_is_bounded_in_total_not_per_process(mode):
    # each process stays under RLIMIT_AS (512 MB); six together would need 2.4 GB
    r = run_python(_SIX_X_400, timeout_s=30, memory_mb=512, max_procs=16)
    assert r.stdout.count("held") <= 1, r.stdout
    assert r.limit_hit == "memory", (r.limit_hit, r.exit_code, r.stdout, r.stderr[-500:])


@pytest.mark.parametrize("mode", MODES[:1], indirect=True)
def test_memory_watchdog_bounds_the_total_without_a_memory_cgroup(mode, monkeypatch):
    real = sandbox.RunCgroup
    monkeypatch.setattr(sandbox, "RunCgroup", lambda procs, mem: real(procs, None))  # as on a host without one
    code = _SIX_X_400.replace("b = bytearray(b'x') * (400 * 2**20)",
                              "b = [bytearray(b'x') * (40 * 2**20) for _ in range(10) if not time.sleep(0.05)]")
    t0 = time.perf_counter()
    r = run_python(code, timeout_s=30, memory_mb=512, max_procs=16)
    assert r.stdout.count("held") <= 2 and r.limit_hit == "memory", (r.stdout, r.stderr[-500:])
    assert time.perf_counter() - t0 < 15


@pytest.mark.skipif(not sandbox.process_limit_enforced(), reason="root without a writable pids cgroup: max_procs "
                    "is not enforceable (the bomb is still killed with its pid namespace at the wall clock)")
@pytest.mark.parametrize("mode", MODES, indirect=True)
def test_fork_bomb_is_bounded_while_it_runs(mode):
    # every process forks forever and never exits: each successful fork prints one line
    code = ("import os, sys, time\n"
            "while True:\n"
            "    try:\n"
            "        if os.fork() == 0:\n"
            "            os.write(1, b'f\\n')\n"
            "    except OSError:\n"
            "        time.sleep(0.01)\n")
    max_procs = 12
    t0 = time.perf_counter()
    r = run_python(code, timeout_s=3, max_procs=max_procs, memory_mb=256)
    assert time.perf_counter() - t0 < 12
    # max_procs counts main.py too, so max_procs - 1 forks is the exact figure; pids.max also holds
    # the wrapper's own processes, and one of those slots can be free while the bomb runs (a CI run
    # under load saw 12 forks): the bound under test is that the bomb stays at max_procs
    forks = r.stdout.count("f")
    assert r.limit_hit == "time" and max_procs // 2 < forks <= max_procs, (forks, r.stderr[-300:])
    deadline = time.time() + 5
    while stray_processes(r.run_id) and time.time() < deadline:
        time.sleep(0.1)
    assert stray_processes(r.run_id) == []


@pytest.mark.parametrize("mode", MODES, indirect=True)
def test_background_process_does_not_outlive_the_call(mode):
    code = ("import os, subprocess, sys, time\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    os.setsid()\n"
            "    if os.fork() == 0:\n"  # a classic daemon: new session, orphaned grandchild
            "        time.sleep(60)\n"
            "    os._exit(0)\n"
            "os.waitpid(pid, 0)\n"
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True)\n"
            "time.sleep(0.3)\n"
            "print('left behind')\n")
    r = run_python(code, timeout_s=20)
    assert r.ok and r.stdout == "left behind\n", r.stderr
    assert stray_processes(r.run_id) == [], "a background process outlived run_python"


def test_gigabyte_of_stdout_is_truncated_without_memory_blowup():
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    t0 = time.perf_counter()
    r = run_python("import sys\nb = b'y' * 2**20\nw = sys.stdout.buffer.write\nfor _ in range(1024):\n    w(b)\n"
                   "sys.stderr.write('done')\n", timeout_s=120, config={"max_output_bytes": 10_000})
    took = time.perf_counter() - t0
    assert r.ok and r.truncated and r.stderr == "done", (r.exit_code, r.limit_hit, r.stderr[-300:])
    assert r.stdout.startswith("y" * 10_000) and f"[{2**30 - 10_000} bytes truncated]" in r.stdout
    grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    assert grew_mb < 64, f"host process grew {grew_mb:.0f} MB reading 1 GB of output"
    print(f"1 GiB of stdout drained in {took:.1f}s, host peak RSS +{grew_mb:.1f} MB")


# ---- the rest of issue 26's list -------------------------------------------------------------


def test_twenty_gigabyte_allocation_is_refused():
    r = run_python("try:\n    b = bytearray(20 * 2**30)\n    print('allocated')\nexcept MemoryError:\n    print('refused')",
                   timeout_s=20, memory_mb=512)
    assert "allocated" not in r.stdout and ("refused" in r.stdout or r.limit_hit == "memory"), (r.stdout, r.limit_hit)


@needs_bwrap
def test_symlinks_in_its_dir_do_not_reach_host_files():
    # the program links its own dir's entries to host secrets; inside, the targets do not exist
    out = _run_json(
        "import os\nout = {}\n"
        "for name, target in [('s', '/etc/shadow'), ('h', '/root/.bashrc'), ('up', '../../../../etc/shadow')]:\n"
        "    os.symlink(target, name)\n"
        "    try:\n        out[name] = open(name).read()[:20]\n"
        "    except OSError as e:\n        out[name] = type(e).__name__\n")
    assert all(v in ("FileNotFoundError", "PermissionError") for v in out.values()), out


@pytest.mark.parametrize("mode", MODES[:1], indirect=True)
def test_host_proc_is_not_visible(mode):
    # bwrap: a pid namespace of its own with its own /proc, listing only the sandbox's processes.
    # (The unshare fallback has a pid namespace but the host's /proc mount: it shows host pids,
    # like the rest of the host filesystem it does not hide — documented in forge.envs.sandbox.)
    out = _run_json("import os\nout = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())")
    assert os.getpid() not in out and len(out) < 10, out
