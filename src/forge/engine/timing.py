"""Device time of short GPU work, measured the way a decode step runs it: inside a CUDA graph."""

from __future__ import annotations

import torch


def graph_time_us(fn, calls: int = 1, replays: int = 5) -> float:
    """Microseconds per fn() call: `calls` calls captured in one CUDA graph, median of `replays` replays.

    Launch overhead is not in it (one timed eager launch of a small kernel measures the launch, not
    the kernel). fn runs once eagerly first (compilation, allocator, library heuristics)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    ts = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / calls)
    del g
    return sorted(ts)[replays // 2] * 1e3
