"""What the actor runtime costs: seconds to spawn N Monarch procs, per-call latency local vs monarch.

    python bench/runtime_latency.py [--procs 1 2 4] [--calls 300] [--out bench.json]

Spawn time is until every proc has constructed the actor and run `setup()` (each proc is a
fresh Python that imports torch and forge). Latency is a sequential round trip of
`call_one()` on a one-proc actor (small payload, and a 1 MiB tensor); throughput is many
concurrent `call_one()` in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import time
from typing import Any

import _record  # noqa: E402  (bench/_record.py: commit, command, device, date in every result file)
import torch

from forge.controller import ForgeActor, endpoint, init_provisioner, shutdown


class Echo(ForgeActor):
    @endpoint
    async def echo(self, x: Any) -> Any:
        return x


def _stats(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {
        "mean_ms": 1e3 * statistics.fmean(s),
        "p50_ms": 1e3 * s[len(s) // 2],
        "p99_ms": 1e3 * s[min(len(s) - 1, int(len(s) * 0.99))],
    }


async def _latency(handle: Any, payload: Any, calls: int) -> dict[str, float]:
    for _ in range(min(20, calls)):  # warm-up
        await handle.echo.call_one(payload)
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        await handle.echo.call_one(payload)
        samples.append(time.perf_counter() - t0)
    return _stats(samples)


async def _throughput(handle: Any, n: int) -> float:
    t0 = time.perf_counter()
    got = await asyncio.gather(*(handle.echo.call_one(i) for i in range(n)))
    assert got == list(range(n)), "answers out of order or wrong"
    return n / (time.perf_counter() - t0)


async def bench_backend(kind: str, calls: int, concurrent: int) -> dict[str, Any]:
    init_provisioner(kind)
    t0 = time.perf_counter()
    actor = await Echo.as_actor()
    spawn = time.perf_counter() - t0
    big = torch.randn(256 * 1024)  # 1 MiB of float32
    out = {
        "spawn_1_proc_s": spawn,
        "small": await _latency(actor, 1, calls),
        "tensor_1MiB": await _latency(actor, big, max(20, calls // 5)),
        "concurrent_calls_per_s": await _throughput(actor, concurrent),
    }
    t0 = time.perf_counter()
    await shutdown()
    out["shutdown_s"] = time.perf_counter() - t0
    return out


async def bench_spawn(procs: list[int]) -> dict[str, dict[str, float]]:
    out = {}
    for n in procs:
        init_provisioner("monarch")
        t0 = time.perf_counter()
        actor = await Echo.options(procs=n).as_actor()
        spawn = time.perf_counter() - t0
        assert len(await actor.echo.call(0)) == n
        t0 = time.perf_counter()
        await shutdown()
        out[str(n)] = {"spawn_s": spawn, "shutdown_s": time.perf_counter() - t0}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4], help="proc counts to spawn on monarch")
    ap.add_argument("--calls", type=int, default=300, help="sequential calls per latency measurement")
    ap.add_argument("--concurrent", type=int, default=500, help="calls in flight for the throughput figure")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    if min(args.procs) < 1 or args.calls < 1 or args.concurrent < 1:
        ap.error("--procs, --calls and --concurrent must be >= 1")

    async def run() -> dict[str, Any]:
        res: dict[str, Any] = {"host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                        "torch": torch.__version__}}
        res["local"] = await bench_backend("local", args.calls, args.concurrent)
        res["monarch"] = await bench_backend("monarch", args.calls, args.concurrent)
        res["monarch_spawn"] = await bench_spawn(args.procs)
        return res

    res = asyncio.run(run())
    print(f"\nhost: {res['host']['cpus']} CPUs, python {res['host']['python']}, torch {res['host']['torch']}")
    print(f"\n{'':28}{'local':>12}{'monarch':>12}")
    for label, key in (("call_one small, mean ms", ("small", "mean_ms")), ("call_one small, p50 ms", ("small", "p50_ms")),
                       ("call_one small, p99 ms", ("small", "p99_ms")), ("call_one 1MiB, mean ms", ("tensor_1MiB", "mean_ms"))):
        print(f"{label:28}{res['local'][key[0]][key[1]]:>12.3f}{res['monarch'][key[0]][key[1]]:>12.3f}")
    print(f"{'concurrent calls/s':28}{res['local']['concurrent_calls_per_s']:>12.0f}"
          f"{res['monarch']['concurrent_calls_per_s']:>12.0f}")
    print(f"{'spawn 1-proc actor, s':28}{res['local']['spawn_1_proc_s']:>12.3f}{res['monarch']['spawn_1_proc_s']:>12.3f}")
    print(f"\n{'monarch procs':>14}{'spawn s':>10}{'shutdown s':>12}")
    for n, r in res["monarch_spawn"].items():
        print(f"{n:>14}{r['spawn_s']:>10.2f}{r['shutdown_s']:>12.2f}")
    if args.out:
        _record.write_json(args.out, res, indent=2)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
