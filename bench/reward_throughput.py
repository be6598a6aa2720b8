"""Reward throughput: completions/s of the math and thinking rewards, realistic and adversarial.

    python bench/reward_throughput.py                     # table + JSON (bench/results/reward_throughput.json)
    python bench/reward_throughput.py --smoke --out /tmp/r.json

Realistic completions: 1-8k characters of reasoning (`<think>`, arithmetic, LaTeX) ending in an
`<answer>`/`\\boxed{}` answer, half right. Adversarial ones: 100k characters of unclosed `\\boxed{`,
`<answer>`, `<think>`, long whitespace runs and a 100k-character `\\boxed` token: the degenerate
rollouts of early RL that took 6-38 s per call before the extractors were made linear.

Each kind is measured two ways: `inline` (the reward called directly: extraction and comparison
cost) and `workers` (through `RewardWorkers`, as `RewardActor` runs it: the process pool with the
configured timeout, so IPC is included and a call past `--timeout-s` would be killed and counted).
Every adversarial call must finish within the timeout: the script exits 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT), str(ROOT / "bench")]

import _record  # noqa: E402  (bench/_record.py: commit, command, device, date in every result file)

from forge.data.rewards import MathReward, RewardTimeout, RewardWorkers, ThinkingReward  # noqa: E402

WORDS = ["so", "we", "get", "then", "the", "sum", "is", "therefore", "multiply", "by", "and", "divide", "hence"]


def realistic(rng: random.Random, n_chars: int) -> tuple[str, str]:
    """(completion, target): reasoning of about `n_chars` characters, then an answer (right half the time)."""
    target = rng.randint(1, 10**6)
    parts = ["<think>"]
    size = 7
    while size < n_chars - 60:
        a, b = rng.randint(2, 999), rng.randint(2, 999)
        piece = rng.choice([
            f"{' '.join(rng.choices(WORDS, k=8))} {a} * {b} = {a * b}. ",
            f"$\\frac{{{a}}}{{{b}}} + {a} = \\frac{{{a * b + a}}}{{{b}}}$ ",
            f"Let x = {a}. Then x^2 = {a * a}.\n",
        ])
        parts.append(piece)
        size += len(piece)
    parts.append("</think>\n")
    answer = target if rng.random() < 0.5 else target + rng.randint(1, 9)
    parts.append(rng.choice([f"<answer>{answer}</answer>", f"The answer is $\\boxed{{{answer}}}$."]))
    return "".join(parts), str(target)


def adversarial(n: int) -> dict[str, str]:
    return {
        "unclosed_boxed": ("\\boxed{" * (n // 7 + 1))[:n],
        "unclosed_answer": ("<answer>" * (n // 8 + 1))[:n],
        "unclosed_think": ("<think>" * (n // 7 + 1))[:n],
        "whitespace_runs": ("<" + " " * 999) * (n // 1000),
        "long_boxed_token": "\\boxed " + "x" * n,
        "nested_braces": "\\boxed{" + "{" * (n // 2) + "}" * (n // 2 - 1),
    }



def bench_inline(fn, items: list[tuple[str, str]], min_time: float) -> dict:
    n, worst, t0 = 0, 0.0, time.perf_counter()
    while True:
        for resp, tgt in items:
            t = time.perf_counter()
            fn("", resp, tgt)
            worst = max(worst, time.perf_counter() - t)
            n += 1
        if time.perf_counter() - t0 >= min_time:
            break
    dt = time.perf_counter() - t0
    return {"completions_per_s": n / dt, "calls": n, "max_call_s": worst}


async def bench_workers(workers: RewardWorkers, index: int, items: list[tuple[str, str]], concurrency: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    worst, timeouts = 0.0, 0

    async def one(resp: str, tgt: str) -> None:
        nonlocal worst, timeouts
        async with sem:
            t = time.perf_counter()
            try:
                await workers.call(index, "", resp, tgt)
            except RewardTimeout:
                timeouts += 1
            worst = max(worst, time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(r, t) for r, t in items))
    dt = time.perf_counter() - t0
    return {"completions_per_s": len(items) / dt, "calls": len(items), "max_call_s": worst, "timeouts": timeouts}


async def run(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    n_real = 16 if args.smoke else 256
    real = [realistic(rng, rng.randint(1000, 8000)) for _ in range(n_real)]
    adv_len = 20_000 if args.smoke else 100_000
    adv = adversarial(adv_len)
    rewards = {"math": MathReward(), "thinking": ThinkingReward()}
    rows = []
    workers = RewardWorkers(list(rewards.values()), workers=args.workers, timeout_s=args.timeout_s)
    try:
        await workers.call(0, "", "<answer>1</answer>", "1")  # start the workers outside the timings
        for w_i, (name, fn) in enumerate(rewards.items()):
            sets = {"realistic_1-8k": real, **{f"adv_{k}_{adv_len // 1000}k": [(v, "1")] for k, v in adv.items()}}
            for kind, items in sets.items():
                inline = bench_inline(fn, items, 0.2 if args.smoke else 1.0)
                pooled = await bench_workers(workers, w_i, items * (1 if len(items) > 1 else 4), args.workers * 2)
                rows.append({"reward": name, "input": kind, "chars": sum(len(r) for r, _ in items) // len(items),
                             "inline": inline, "workers": pooled})
    finally:
        await workers.close()
    return {
        "setup": f"{platform.processor() or platform.machine()} ({platform.node()}), CPU only, "
                  f"{args.workers} reward worker processes",
        "timeout_s": args.timeout_s,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "reward_throughput.json"))
    p.add_argument("--timeout-s", type=float, default=10.0, help="the reward timeout (RewardActor's default)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="small inputs, short timings (the test runs this)")
    args = p.parse_args(argv)
    result = asyncio.run(run(args))
    print(f"{'reward':9} {'input':34} {'chars':>7} {'inline c/s':>11} {'max s':>7} {'workers c/s':>12} {'max s':>7}")
    bad = []
    for r in result["rows"]:
        i, w = r["inline"], r["workers"]
        print(f"{r['reward']:9} {r['input']:34} {r['chars']:7d} {i['completions_per_s']:11.1f} {i['max_call_s']:7.3f} "
              f"{w['completions_per_s']:12.1f} {w['max_call_s']:7.3f}")
        if r["input"].startswith("adv_") and (w["timeouts"] or max(i["max_call_s"], w["max_call_s"]) > args.timeout_s):
            bad.append(f"{r['reward']}/{r['input']}")
    result["adversarial_within_timeout"] = not bad
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _record.write_json(out, result, indent=2)  # with commit, command, device, date
    print(f"wrote {out}")
    if bad:
        print(f"over the {args.timeout_s}s timeout: {', '.join(bad)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
