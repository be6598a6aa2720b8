"""Sandboxed code execution: limits, isolation, concurrency, cleanup (bwrap, or the unshare fallback)."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from forge.envs import sandbox
from forge.envs.sandbox import SandboxUnavailableError, run_python, sandbox_mode, stray_processes
from forge.errors import InfraError

# sandbox_mode() always finds something ("rlimits" at worst); a sandbox that then cannot run raises
# InfraError with its cause, which must fail these tests, not skip them
MODE = sandbox_mode()
needs_ns = pytest.mark.skipif(MODE == "rlimits", reason="no namespace isolation on this host (unshare not permitted)")
needs_bwrap = pytest.mark.skipif(MODE != "bwrap", reason="read-only host filesystem needs bubblewrap")


def _leftover_dirs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "forge-sbx-*")))


@pytest.fixture
def own_tmp(tmp_path, monkeypatch):
    """Sandbox dirs of this test only: other sandboxes running on the host never count as leftovers."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def test_runs_code_with_stdin_and_files():
    r = run_python("import sys\nprint(open('data/x.txt').read().strip(), sys.stdin.read().upper())",
                   stdin="hello", files={"data/x.txt": "from-file\n"}, timeout_s=10)
    assert r.ok and r.stdout == "from-file HELLO\n" and r.limit_hit is None
    r = run_python("raise SystemExit(3)", timeout_s=10)
    assert r.exit_code == 3 and not r.timed_out and r.limit_hit is None
    r = run_python("1/0", timeout_s=10)
    assert r.exit_code == 1 and "ZeroDivisionError" in r.stderr


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="timeout_s"):
        run_python("print(1)", timeout_s=0)
    with pytest.raises(ValueError, match="relative"):
        run_python("print(1)", files={"/etc/x": "no"})
    with pytest.raises(ValueError, match="relative"):
        run_python("print(1)", files={"../x": "no"})
    with pytest.raises(TypeError):
        run_python(b"print(1)")  # type: ignore[arg-type]


def test_infinite_loop_killed_at_wall_clock_limit():
    t0 = time.perf_counter()
    r = run_python("while True:\n    pass", timeout_s=1.5, cpu_time_s=30)
    took = time.perf_counter() - t0
    assert r.timed_out and r.limit_hit == "time" and r.exit_code != 0
    assert 1.4 <= r.duration_s < 4 and took < 6


def test_sleeping_loop_killed_at_wall_clock_limit():
    r = run_python("import time\nwhile True:\n    time.sleep(0.1)", timeout_s=1.0)
    assert r.timed_out and r.limit_hit == "time" and r.duration_s < 3


def test_cpu_time_limit():
    r = run_python("while True:\n    pass", timeout_s=20, cpu_time_s=1)
    assert not r.timed_out and r.limit_hit == "cpu" and r.exit_code != 0 and r.duration_s < 5


def test_memory_bomb_killed():
    r = run_python("x = []\nwhile True:\n    x.append(bytearray(50 * 2**20))", timeout_s=10, memory_mb=256)
    assert r.limit_hit == "memory" and r.exit_code != 0 and not r.timed_out
    r = run_python("x = bytearray(4 * 2**30)", timeout_s=10, memory_mb=256)
    assert r.limit_hit == "memory"


def test_fork_bomb_contained_and_cleaned_up(own_tmp):
    before = _leftover_dirs()
    code = ("import os\n"
            "while True:\n"
            "    try:\n"
            "        os.fork()\n"
            "    except OSError:\n"
            "        pass\n")
    t0 = time.perf_counter()
    # where max_procs cannot be enforced (root, no pids cgroup) only the pid namespace + wall clock
    # contain it: keep that window short
    r = run_python(code, timeout_s=2.0 if sandbox.process_limit_enforced() else 0.5, max_procs=16, memory_mb=128)
    assert time.perf_counter() - t0 < 10, "the fork bomb outlived its wall clock"
    assert r.exit_code != 0 and r.limit_hit in ("time", "procs", "cpu")
    deadline = time.time() + 5
    while stray_processes(r.run_id) and time.time() < deadline:
        time.sleep(0.1)
    assert stray_processes(r.run_id) == [], "fork-bomb processes survived the sandbox"
    # the host is still healthy: it can start processes right away
    assert subprocess.run(["true"], timeout=10).returncode == 0
    assert run_python("print('alive')", timeout_s=10).stdout == "alive\n"
    assert _leftover_dirs() <= before


@pytest.mark.skipif(not sandbox.process_limit_enforced(), reason="root without a writable pids cgroup: max_procs "
                    "is not enforceable (fork bombs are still killed with their pid namespace)")
def test_process_limit_reported():
    # A bounded number of forks, each child waiting: beyond max_procs, fork fails (EAGAIN).
    code = ("import os, time\n"
            "kids = []\n"
            "for i in range(200):\n"
            "    pid = os.fork()\n"
            "    if pid == 0:\n"
            "        time.sleep(3); os._exit(0)\n"
            "    kids.append(pid)\n")
    r = run_python(code, timeout_s=8, max_procs=8)
    assert r.exit_code != 0 and r.limit_hit == "procs", r.stderr[-300:]


@needs_ns
def test_network_is_unreachable():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    try:
        code = ("import socket\n"
                "for host in ('127.0.0.1', '1.1.1.1'):\n"
                "    try:\n"
                f"        socket.create_connection((host, {port} if host == '127.0.0.1' else 53), timeout=2)\n"
                "        print('CONNECTED', host)\n"
                "    except OSError as e:\n"
                "        print('failed', host, type(e).__name__)\n")
        r = run_python(code, timeout_s=15)
        assert "CONNECTED" not in r.stdout and r.stdout.count("failed") == 2, r.stdout + r.stderr
    finally:
        srv.close()


@needs_bwrap
def test_writes_outside_the_temp_dir_fail(tmp_path):
    target = tmp_path / "escaped.txt"
    home_target = os.path.join(os.path.dirname(os.path.abspath(__file__)), "escaped_from_sandbox.txt")
    code = ("import os\n"
            f"for p in ({str(target)!r}, {home_target!r}, '/etc/forge_escape', '/usr/forge_escape'):\n"
            "    try:\n"
            "        open(p, 'w').write('x')\n"
            "        print('wrote', p)\n"
            "    except OSError as e:\n"
            "        print('denied', p, e.errno)\n"
            "open('inside.txt', 'w').write('ok')\n"
            "print('inside', open('inside.txt').read())\n")
    r = run_python(code, timeout_s=10)
    assert "inside ok" in r.stdout, r.stderr
    # /tmp inside the sandbox is a private tmpfs: a write "there" never reaches the host
    assert not target.exists()
    assert not os.path.exists(home_target) and not os.path.exists("/etc/forge_escape")
    assert not os.path.exists("/usr/forge_escape")
    assert r.stdout.count("denied") >= 3


def test_eight_concurrent_runs_all_correct(own_tmp):
    before = _leftover_dirs()
    codes = [f"import sys\nprint(sum(range({i * 1000})), sys.stdin.read())" for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda ic: run_python(ic[1], stdin=f"run{ic[0]}", timeout_s=30), enumerate(codes)))
    for i, r in enumerate(results):
        assert r.ok, r.stderr
        assert r.stdout == f"{sum(range(i * 1000))} run{i}\n"
    assert len({r.run_id for r in results}) == 8
    assert all(stray_processes(r.run_id) == [] for r in results)
    assert _leftover_dirs() <= before


def test_output_is_capped():
    r = run_python("import sys\nfor _ in range(200):\n    sys.stdout.write('x' * 10000)", timeout_s=10,
                   config={"max_output_bytes": 5000})
    assert r.truncated and r.stdout.startswith("x" * 5000) and "truncated" in r.stdout and len(r.stdout) < 6000


def test_strict_mode_refuses_without_bwrap(monkeypatch):
    monkeypatch.setattr(sandbox, "bwrap_available", lambda: False)
    with pytest.raises(SandboxUnavailableError, match="bubblewrap"):
        run_python("print(1)", strict=True)
    with pytest.raises(SandboxUnavailableError):
        run_python("print(1)", config="strict")


@needs_ns
def test_fallback_without_bwrap_warns_once_and_isolates_network(monkeypatch, caplog):
    monkeypatch.setattr(sandbox, "bwrap_available", lambda: False)
    monkeypatch.setattr(sandbox, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="forge.envs.sandbox"):
        r1 = run_python("print('hi')", timeout_s=10)
        r2 = run_python("import socket\ntry:\n    socket.create_connection(('1.1.1.1', 53), timeout=2)\n"
                        "    print('CONNECTED')\nexcept OSError:\n    print('failed')", timeout_s=10)
    assert r1.stdout == "hi\n" and r1.isolation == "unshare"
    assert r2.stdout == "failed\n"
    assert sum("bubblewrap" in rec.getMessage() for rec in caplog.records) == 1
    r3 = run_python("while True:\n    pass", timeout_s=1.0, cpu_time_s=30)  # the wall clock kills it, not RLIMIT_CPU
    assert r3.limit_hit == "time" and stray_processes(r3.run_id) == []


def test_config_spec_validation():
    assert sandbox.SandboxConfig.from_spec("strict").strict
    with pytest.raises(ValueError, match="unknown keys"):
        sandbox.SandboxConfig.from_spec({"timeout": 3})
    with pytest.raises(ValueError):
        sandbox.SandboxConfig.from_spec("lenient")


@contextlib.contextmanager
def symlinked_venv(tmp_path):
    """A real venv under /tmp reached through a symlink outside /tmp (`/var/tmp/x/.venv -> /tmp/.../.venv`),
    as in issue 21; yields the linked `bin/python`."""
    real = tmp_path / "x" / ".venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(real)], check=True, capture_output=True, timeout=120)
    link_dir = tempfile.mkdtemp(prefix="forge-venvlink-", dir="/var/tmp" if os.access("/var/tmp", os.W_OK) else None)
    link = os.path.join(link_dir, ".venv")
    os.symlink(real, link)
    try:
        yield os.path.join(link, "bin", "python")
    finally:
        os.remove(link)
        os.rmdir(link_dir)


def test_symlinked_venv_under_tmp_runs(tmp_path):
    with symlinked_venv(tmp_path) as py:
        r = run_python("import sys\nprint(sys.prefix, 6 * 7)", timeout_s=20, config={"python": py})
        assert r.ok and r.stdout == f"{os.path.dirname(os.path.dirname(py))} 42\n", r.stderr


# ---- infrastructure failures are InfraError, never a result ----------------------------------
def test_missing_or_broken_interpreter_is_infra_error(tmp_path):
    with pytest.raises(InfraError, match="/no/such/python"):
        run_python("print(1)", config={"python": "/no/such/python"})
    broken = tmp_path / "venv" / "bin" / "python"
    broken.parent.mkdir(parents=True)
    broken.symlink_to(tmp_path / "gone" / "python3")
    with pytest.raises(InfraError, match=r"symlink chain: .*venv/bin/python -> .*gone/python3"):
        run_python("print(1)", config={"python": str(broken)})
    not_python = tmp_path / "python"
    not_python.write_text("#!/bin/sh\necho 'no python here' >&2\nexit 3\n")
    not_python.chmod(0o755)
    with pytest.raises(InfraError, match="does not run on the host.*no python here"):
        run_python("print(1)", config={"python": str(not_python)})


@needs_bwrap
def test_bwrap_error_is_infra_error_with_its_stderr(monkeypatch):
    missing = f"/nonexistent-{os.getpid()}"
    real = sandbox._bwrap_args
    monkeypatch.setattr(sandbox, "_bwrap_args", lambda *a: [*real(*a), "--ro-bind", missing, "/x"])
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with pytest.raises(InfraError, match=f"bwrap: Can't find source path {missing}"):
            run_python("print(1)", timeout_s=10)
    assert len(os.listdir("/proc/self/fd")) <= fds, "a failed start leaked file descriptors"


@needs_bwrap
def test_interpreter_that_cannot_run_inside_is_infra_error(tmp_path):
    # runs on the host, but execs a path outside everything the sandbox exposes
    hidden = tempfile.mkdtemp(prefix="forge-hidden-", dir="/var/tmp")
    os.symlink(os.path.realpath(sys.executable), os.path.join(hidden, "python"))
    wrapper = tmp_path / "python"
    wrapper.write_text(f"#!/bin/sh\nexec {hidden}/python \"$@\"\n")
    wrapper.chmod(0o755)
    try:
        with pytest.raises(InfraError, match=f"could not start the interpreter .*{hidden}/python"):
            run_python("print(1)", timeout_s=10, config={"python": str(wrapper)})
    finally:
        os.remove(os.path.join(hidden, "python"))
        os.rmdir(hidden)


def test_python_tool_lets_infra_error_through(tmp_path):
    # a tool's own failures are observations for the model; a sandbox that cannot start is not
    import asyncio

    from forge.envs.code import python_tool
    from forge.envs.tools import ToolCall, ToolRegistry

    reg = ToolRegistry([python_tool({"python": str(tmp_path / "no-python")})])
    with pytest.raises(InfraError, match="no-python"):
        asyncio.run(reg.execute(ToolCall(name="python", arguments={"code": "print(1)"}, raw="")))
    ok = ToolRegistry([python_tool()])
    r = asyncio.run(ok.execute(ToolCall(name="python", arguments={"code": "print(6 * 7)"}, raw="")))
    assert r.status == "ok" and r.text == "42"


def test_start_timeout_is_infra_error():
    with pytest.raises(InfraError, match="did not start within start_timeout_s"):
        run_python("print(1)", config={"start_timeout_s": 0.001})


def test_program_cannot_fake_an_infra_error():
    # what the program prints or how it exits is its result, even when it imitates bwrap
    r = run_python("import sys\nsys.stderr.write('bwrap: execvp python: No such file or directory\\n')\n"
                   "sys.exit(1)", timeout_s=10)
    assert r.exit_code == 1 and "execvp" in r.stderr
    r = run_python("import os\nos.execv('/no/such/binary', ['x'])", timeout_s=10)
    assert r.exit_code == 1 and "FileNotFoundError" in r.stderr


@pytest.mark.skipif(not sandbox.bwrap_available(), reason="needs bubblewrap")
def test_interpreter_under_tmp_stays_visible(tmp_path):
    # a checkout (and its venv) under /tmp: the sandbox's fresh /tmp must not hide the interpreter
    assert str(tmp_path).startswith("/tmp/")
    py = tmp_path / "venv" / "bin" / "python"
    py.parent.mkdir(parents=True)
    py.symlink_to(os.path.realpath(sys.executable))
    r = run_python("print(6 * 7)", timeout_s=20, config={"python": str(py)})
    assert r.ok and r.stdout == "42\n", r.stderr
