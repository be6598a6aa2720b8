"""`RewardActor`: scores responses with one or more rewards; a failing reward never stops a run.

    reward = await RewardActor.options(num_replicas=2).as_service(
        rewards=[{"_target_": "math", "weight": 1.0}, {"_target_": "thinking", "weight": 0.2}])
    r = await reward.evaluate_response.route(prompt=p, response=text, target=t)       # float
    items = await reward.evaluate.route(prompts, responses, targets)   # [{"total", "breakdown", "errors"}]

torchforge's form `RewardActor(reward_functions=[MathReward(), ThinkingReward()])` works too;
as there, its total is the MEAN of the rewards (a `rewards:` spec gives the weighted SUM).

Each reward call runs with a timeout. A reward that raises or times out scores 0 for that item,
`reward/errors/<name>` counts it (`reward/timeouts/<name>` for hangs) and evaluation goes on.
Isolation:
- `"thread"` (default): each call runs in a daemon thread. A timed-out call is abandoned: Python
  cannot kill a thread, so a truly hung function keeps a thread (and some GIL time) until it
  returns. At most `max_abandoned` such threads may exist; past that, calls of that reward fail
  fast (scored 0, counted) instead of piling up threads. Daemon threads never block exit.
- `"process"`: calls run in a small spawn-process pool; a hang terminates and rebuilds the pool
  (calls in flight on it at that moment also score 0). Needs picklable rewards (import paths,
  module-level functions/classes), and pays process start-up once.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import threading
from concurrent.futures import Future
from typing import Any, Callable, Sequence

from forge.controller import ForgeActor, endpoint
from forge.data.rewards import CombinedReward, build_rewards, reward_name
from forge.data.rewards.combine import call_reward as _call_reward
from forge.observability import Reduce, record_metric


class RewardTimeout(Exception):
    pass


def _call_in_daemon_thread(fn: Callable[[], float]) -> tuple[Future, threading.Thread]:
    fut: Future = Future()

    def run() -> None:
        # once running, the future cannot be cancelled (an awaiting task that times out tries to), so the
        # result below always has somewhere to go; one cancelled before the thread starts is not run
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn())
        except BaseException as e:  # noqa: BLE001 — handed to the awaiting caller
            fut.set_exception(e)

    t = threading.Thread(target=run, name="forge-reward", daemon=True)
    t.start()
    return fut, t


class RewardActor(ForgeActor):
    def __init__(self, rewards: Any = None, reward_functions: Sequence[Callable[..., float]] | None = None,
                 weights: Sequence[float] | None = None, timeout_s: float = 10.0,
                 isolation: str = "thread", max_abandoned: int = 8, max_concurrency: int = 64,
                 process_workers: int = 2):
        if (rewards is None) == (reward_functions is None):
            raise ValueError("RewardActor: give exactly one of `rewards` (a spec: list of {_target_, weight, ...}) "
                             "or `reward_functions` (a list of callables)")
        if reward_functions is not None:
            self.combined = CombinedReward(list(reward_functions), weights, normalize=True)
        else:
            self.combined = build_rewards(rewards)
            if weights is not None:
                raise ValueError("RewardActor: put weights inside the `rewards` spec entries")
        if timeout_s <= 0:
            raise ValueError(f"RewardActor: timeout_s must be > 0, got {timeout_s}")
        if isolation not in ("thread", "process"):
            raise ValueError(f"RewardActor: isolation must be 'thread' or 'process', got {isolation!r}")
        self.timeout_s = timeout_s
        self.isolation = isolation
        self.max_abandoned = max_abandoned
        self.process_workers = process_workers
        self._abandoned: list[threading.Thread] = []
        self._sem = asyncio.Semaphore(max_concurrency)
        self._pool: Any = None

    # ---- one reward call, bounded ----------------------------------------------------------
    def _pool_get(self) -> Any:
        if self._pool is None:
            self._pool = multiprocessing.get_context("spawn").Pool(self.process_workers)
        return self._pool

    def _pool_reset(self) -> None:
        if self._pool is not None:
            self._pool.terminate()  # kills the hung worker (and any call in flight on this pool)
            self._pool = None

    async def _run_one(self, fn: Callable[..., float], prompt: str, response: str, target: Any) -> float:
        if self.isolation == "process":
            pool = self._pool_get()
            res = pool.apply_async(_call_reward, (fn, prompt, response, target))
            try:
                return await asyncio.to_thread(res.get, self.timeout_s)
            except multiprocessing.TimeoutError:
                if pool is self._pool:
                    self._pool_reset()
                raise RewardTimeout(f"no result in {self.timeout_s}s") from None
        self._abandoned = [t for t in self._abandoned if t.is_alive()]
        if len(self._abandoned) >= self.max_abandoned:
            raise RewardTimeout(f"{len(self._abandoned)} earlier reward calls are still hung; not starting more")
        fut, thread = _call_in_daemon_thread(lambda: _call_reward(fn, prompt, response, target))
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), self.timeout_s)
        except asyncio.TimeoutError:
            self._abandoned.append(thread)
            raise RewardTimeout(f"no result in {self.timeout_s}s") from None

    async def _score(self, prompt: str, response: str, target: Any) -> dict[str, Any]:
        async def one(name: str, fn: Callable[..., float]) -> tuple[str, float, str | None]:
            async with self._sem:
                try:
                    v = await self._run_one(fn, prompt, response, target)
                    if not math.isfinite(v):
                        raise ValueError(f"returned {v}")
                    return name, v, None
                except RewardTimeout as e:
                    record_metric(f"reward/timeouts/{name}", 1, Reduce.SUM)
                    return name, 0.0, f"timeout: {e}"
                except Exception as e:  # noqa: BLE001 — a broken reward must not stop the run
                    return name, 0.0, f"{type(e).__name__}: {e}"

        c = self.combined
        results = await asyncio.gather(*(one(n, f) for n, f in zip(c.names, c.rewards)))
        breakdown = {n: v for n, v, _ in results}
        errors = {n: err for n, _, err in results if err is not None}
        for n in errors:
            record_metric(f"reward/errors/{n}", 1, Reduce.SUM)
        return {"total": c.total(breakdown), "breakdown": breakdown, "errors": errors}

    @staticmethod
    def _record(items: list[dict[str, Any]]) -> None:
        keys = list(items[0]["breakdown"]) + ["total"] if items else []
        for key in keys:
            for it in items:
                v = it["total"] if key == "total" else it["breakdown"][key]
                for red in (Reduce.MEAN, Reduce.STD, Reduce.MIN, Reduce.MAX):
                    record_metric(f"reward/{key}/{red.value}", v, red)
        record_metric("reward/count", len(items), Reduce.SUM)

    # ---- endpoints -------------------------------------------------------------------------
    @endpoint
    async def evaluate_response(self, prompt: str, response: str, target: Any,
                                return_breakdown: bool = False) -> float | dict[str, Any]:
        """The total reward of one response (the full item dict with `return_breakdown=True`)."""
        item = await self._score(prompt, response, target)
        self._record([item])
        return item if return_breakdown else item["total"]

    @endpoint
    async def evaluate(self, prompts: Sequence[str], responses: Sequence[str],
                       targets: Sequence[Any], record: bool = True) -> list[dict[str, Any]]:
        """Score a batch: one `{"total", "breakdown": {name: value}, "errors": {name: msg}}` per item.
        `record=False` keeps the scores out of the step's reward metrics (held-out evaluation)."""
        if not len(prompts) == len(responses) == len(targets):
            raise ValueError(f"evaluate: {len(prompts)} prompts, {len(responses)} responses, "
                             f"{len(targets)} targets; they must be the same length")
        items = list(await asyncio.gather(*(self._score(p, r, t) for p, r, t in zip(prompts, responses, targets))))
        if record:
            self._record(items)
        return items

    @endpoint
    async def reward_names(self) -> list[str]:
        return list(self.combined.names)

    async def teardown(self) -> None:
        self._pool_reset()


__all__ = ["RewardActor", "RewardTimeout", "reward_name"]
