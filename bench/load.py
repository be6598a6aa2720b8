"""Load: N concurrent `route()` calls to a trivial service and to the reward service, per provisioner.

    python bench/load.py [--calls 10000] [--replicas 2] [--backends local monarch] [--out load.json]
    python bench/load.py --smoke [--backends monarch]   # 500 calls (what tests/test_bench_load.py runs)

Per (backend, service): all `--calls` calls are started at once (one `asyncio.gather`), each
timed from its own start to its answer. Reported: throughput (calls / wall seconds of the wave),
p50/p99/max latency, errors (any exception or a wrong answer; must be 0) and memory: RSS of
this process and of every process it spawned (monarch procs), before the first wave, after it,
and after a second identical wave. Growth in the first wave is buffers reaching their working
size; growth in the second wave is what a leak looks like (it should be ~0). Metric records are
taken after each wave (as the training loop does each step; they are buffered until then).

The trivial service echoes its argument; the reward service is `RewardActor` with the math
reward, scoring a random integer answer against a random target (each call's expected score
is known, so a wrong answer counts as an error). Exit status 1 if any call failed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _record  # noqa: E402  (bench/_record.py: commit, command, device, date in every result file)

from forge.actors.reward import RewardActor  # noqa: E402
from forge.controller import ForgeActor, endpoint, get_provisioner, init_provisioner, shutdown  # noqa: E402
from forge.observability.metrics import drain  # noqa: E402


class Echo(ForgeActor):
    @endpoint
    async def echo(self, x: Any) -> Any:
        return x


# ---- memory ---------------------------------------------------------------------------------
def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError, PermissionError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def memory_mib() -> dict[str, float]:
    """RSS of this process, and of all its descendants together (the monarch procs)."""
    me = os.getpid()
    return {"controller_mib": _rss_kib(me) / 1024,
            "children_mib": sum(_rss_kib(p) for p in _descendants(me)) / 1024}


# ---- one wave ---------------------------------------------------------------------------------
def _pct(s: list[float], q: float) -> float:
    return s[min(len(s) - 1, int(len(s) * q))]


async def wave(call: Callable[[int], Awaitable[bool]], n: int) -> dict[str, Any]:
    """`n` calls started together; `call(i)` returns whether the answer was right."""
    lat: list[float] = []
    errors: list[str] = []

    async def one(i: int) -> None:
        t0 = time.perf_counter()
        try:
            ok = await call(i)
        except Exception as e:  # noqa: BLE001 — counted and reported, the bench goes on
            errors.append(f"{type(e).__name__}: {e}")
            return
        lat.append(time.perf_counter() - t0)
        if not ok:
            errors.append(f"call {i}: wrong answer")

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.perf_counter() - t0
    s = sorted(lat) or [float("nan")]
    return {"calls": n, "wall_s": wall, "calls_per_s": n / wall, "p50_ms": 1e3 * _pct(s, 0.50),
            "p99_ms": 1e3 * _pct(s, 0.99), "max_ms": 1e3 * s[-1], "errors": len(errors),
            "first_errors": errors[:5]}


async def _echo_service(replicas: int) -> tuple[Any, Callable[[int], Awaitable[bool]]]:
    svc = await Echo.options(num_replicas=replicas).as_service()
    payloads = [random.random() for _ in range(64)]

    async def call(i: int) -> bool:
        x = payloads[i % len(payloads)] + i
        return await svc.echo.route(x) == x
    return svc, call


async def _reward_service(replicas: int) -> tuple[Any, Callable[[int], Awaitable[bool]]]:
    svc = await RewardActor.options(num_replicas=replicas).as_service(rewards=[{"_target_": "math"}])
    rng = random.Random(0)
    cases = []
    for _ in range(64):
        target = rng.randint(-10**6, 10**6)
        answer = target if rng.random() < 0.5 else target + rng.randint(1, 99)
        cases.append((f"What is {target}?", f"<answer>{answer}</answer>", str(target), answer == target))

    async def call(i: int) -> bool:
        prompt, response, target, right = cases[i % len(cases)]
        got = await svc.evaluate_response.route(prompt=prompt, response=response, target=target)
        return (got == 1.0) if right else (got < 1.0)
    return svc, call


SERVICES = {"echo": _echo_service, "reward": _reward_service}


async def _flush_metrics() -> int:
    """What MetricLogger.flush does each training step: take every metric record (this process's
    and the services'). Records are kept until then, so without it memory grows with the calls."""
    return len(drain()) + len(await get_provisioner().collect_metrics())


async def bench_one(backend: str, service: str, calls: int, replicas: int) -> dict[str, Any]:
    init_provisioner(backend)
    try:
        svc, call = await SERVICES[service](replicas)
        await wave(call, min(100, calls))  # warm-up: connections, imports, first-call paths
        await _flush_metrics()
        mem0 = memory_mib()
        first = await wave(call, calls)
        first["metric_records"] = await _flush_metrics()
        mem1 = memory_mib()
        second = await wave(call, calls)
        second["metric_records"] = await _flush_metrics()
        mem2 = memory_mib()
    finally:
        await shutdown()
    growth = {f"{k}_wave1": mem1[k] - mem0[k] for k in mem0} | {f"{k}_wave2": mem2[k] - mem1[k] for k in mem0}
    return {"backend": backend, "service": service, "replicas": replicas, "wave1": first, "wave2": second,
            "memory_before_mib": mem0, "memory_after_mib": mem2, "memory_growth_mib": growth}



def _machine() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
            "loadavg_at_start": load}


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'backend':9}{'service':8}{'calls':>7}{'calls/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}"
          f"{'errors':>7}{'ctl MiB +w1/+w2':>18}{'procs MiB +w1/+w2':>20}")
    for r in rows:
        g = r["memory_growth_mib"]
        for w in ("wave1", "wave2"):
            s = r[w]
            mem = (f"{g['controller_mib_' + w]:>+18.1f}{g['children_mib_' + w]:>+20.1f}")
            print(f"{r['backend']:9}{r['service'] + ('' if w == 'wave1' else '²'):8}{s['calls']:>7}"
                  f"{s['calls_per_s']:>10.0f}{s['p50_ms']:>10.1f}{s['p99_ms']:>10.1f}{s['max_ms']:>10.1f}"
                  f"{s['errors']:>7}{mem}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=10_000, help="concurrent route() calls per wave")
    ap.add_argument("--replicas", type=int, default=2, help="replicas per service")
    ap.add_argument("--backends", nargs="+", choices=["local", "monarch"], help="default: both (--smoke: local)")
    ap.add_argument("--services", nargs="+", default=list(SERVICES), choices=list(SERVICES))
    ap.add_argument("--smoke", action="store_true", help="500 calls, local backend unless --backends (CI)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.smoke:
        args.calls = 500
    args.backends = args.backends or (["local"] if args.smoke else ["local", "monarch"])
    if args.calls < 1 or args.replicas < 1:
        ap.error("--calls and --replicas must be >= 1")

    res: dict[str, Any] = {
        "machine": _machine(), "results": [],
    }
    for backend in args.backends:
        for service in args.services:
            r = asyncio.run(bench_one(backend, service, args.calls, args.replicas))
            res["results"].append(r)
            print(f"{backend}/{service}: {r['wave1']['calls_per_s']:.0f} calls/s, errors "
                  f"{r['wave1']['errors'] + r['wave2']['errors']}", flush=True)
    res["machine"]["loadavg_at_end"] = os.getloadavg()
    print_table(res["results"])
    print("(² = the second identical wave; its memory growth is the leak figure)")
    if args.out:
        _record.write_json(args.out, res, indent=2)  # with commit, command, device, date
        print(f"\nwrote {args.out}")
    return 1 if any(r[w]["errors"] for r in res["results"] for w in ("wave1", "wave2")) else 0


if __name__ == "__main__":
    sys.exit(main())
