"""`RewardActor`: scores responses with one or more rewards; a broken reward is never a score.

    reward = await RewardActor.options(num_replicas=2).as_service(
        rewards=[{"_target_": "math", "weight": 1.0}, {"_target_": "thinking", "weight": 0.2}])
    r = await reward.evaluate_response.route(prompt=p, response=text, target=t)       # float
    items = await reward.evaluate.route(prompts, responses, targets)
    # one per item: {"total", "breakdown": {name: value}, "errors": {name: msg}, "failed", "infra_error"}

torchforge's form `RewardActor(reward_functions=[MathReward(), ThinkingReward()])` works too;
as there, its total is the MEAN of the rewards (a `rewards:` spec gives the weighted SUM).

Infrastructure failures. A reward that raises, returns NaN/inf, or runs past `timeout_s` is an
infrastructure failure (`forge.errors.InfraError`), not a wrong answer: the item comes back with
`failed: True`, `infra_error: "<reward>: <cause>"`, `total` NaN (the failing rewards' breakdown
values NaN too), so it can never be mistaken for a 0 score. `reward/infra_errors` counts failed
items, `reward/errors/<name>` (and `reward/timeouts/<name>`) each reward's failures; the first
failure of an actor is logged with its exact cause. `evaluate_response` (a float, for torchforge
compatibility) raises the `InfraError` instead. Failed items are kept out of the reward metrics.

Isolation (how `timeout_s` is enforced):
- `"process"` (default): calls run in `process_workers` spawn processes
  (`forge.data.rewards.RewardWorkers`); a call past its timeout gets its worker killed and
  replaced (only that worker: other calls go on). Rewards must pickle (built-in names, import
  paths, module-level functions/classes): a clear error at start otherwise.
- `"thread"`: each call runs in a daemon thread. Python cannot kill a thread, so a timed-out call
  keeps its thread until it returns. At most `max_abandoned` reward threads are alive at once
  (running or hung: the bound is taken before a thread starts), so hung calls can never pile
  up; a call that finds every slot taken by a hung thread fails at once (an `InfraError`), one
  that finds them busy waits up to `timeout_s` for one.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from forge.controller import ForgeActor, endpoint
from forge.data.rewards import CombinedReward, build_rewards, reward_name
from forge.data.rewards.combine import call_reward as _call_reward
from forge.data.rewards.workers import RewardTimeout, RewardWorkers
from forge.errors import InfraError
from forge.observability import Reduce, record_metric

log = logging.getLogger("forge.reward")
ISOLATIONS = ("process", "thread")


def _call_in_daemon_thread(fn: Callable[[], float],
                           slots: threading.BoundedSemaphore | None = None) -> tuple[Future, threading.Thread]:
    """Run `fn` in a daemon thread; `slots` (already acquired by the caller) is released when the
    thread really ends, however long after its caller gave up on it."""
    fut: Future = Future()

    def run() -> None:
        try:
            # once running, the future cannot be cancelled (an awaiting task that times out tries to), so the
            # result below always has somewhere to go; one cancelled before the thread starts is not run
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 — handed to the awaiting caller
                fut.set_exception(e)
        finally:
            if slots is not None:
                slots.release()

    t = threading.Thread(target=run, name="forge-reward", daemon=True)
    t.start()
    return fut, t


class RewardActor(ForgeActor):
    def __init__(self, rewards: Any = None, reward_functions: Sequence[Callable[..., float]] | None = None,
                 weights: Sequence[float] | None = None, timeout_s: float = 10.0,
                 isolation: str = "process", max_abandoned: int = 8, max_concurrency: int = 64,
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
        if not timeout_s > 0:
            raise ValueError(f"RewardActor: timeout_s must be > 0, got {timeout_s}")
        if isolation not in ISOLATIONS:
            raise ValueError(f"RewardActor: isolation must be one of {ISOLATIONS}, got {isolation!r}")
        if max_abandoned < 1:
            raise ValueError(f"RewardActor: max_abandoned must be >= 1, got {max_abandoned}")
        self.timeout_s = timeout_s
        self.isolation = isolation
        self.max_abandoned = max_abandoned
        self._sem = asyncio.Semaphore(max_concurrency)
        # thread isolation: reward threads alive (running or hung), bounded before each start
        self._slots = threading.BoundedSemaphore(max_abandoned)
        self._hung: list[threading.Thread] = []
        self._workers = RewardWorkers(self.combined.rewards, process_workers, timeout_s) \
            if isolation == "process" else None
        self._logged_infra_error = False

    # ---- one reward call, bounded ----------------------------------------------------------
    async def _run_one(self, index: int, prompt: str, response: str, target: Any) -> float:
        if self._workers is not None:
            return await self._workers.call(index, prompt, response, target)
        fn = self.combined.rewards[index]
        deadline = time.monotonic() + self.timeout_s
        while not self._slots.acquire(blocking=False):
            self._hung = [t for t in self._hung if t.is_alive()]
            if len(self._hung) >= self.max_abandoned:
                raise InfraError(f"all {self.max_abandoned} reward threads (max_abandoned) are hung in earlier "
                                 f"calls that timed out; not starting more")
            if time.monotonic() > deadline:
                raise RewardTimeout(f"no free reward thread within {self.timeout_s}s "
                                    f"({self.max_abandoned} busy or hung)")
            await asyncio.sleep(0.01)
        fut, thread = _call_in_daemon_thread(lambda: _call_reward(fn, prompt, response, target), self._slots)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), self.timeout_s)
        except TimeoutError:
            self._hung.append(thread)
            raise RewardTimeout(f"no result in {self.timeout_s}s (its thread cannot be stopped: "
                                f"isolation='process' can)") from None

    async def _score(self, prompt: str, response: str, target: Any) -> dict[str, Any]:
        async def one(index: int, name: str) -> tuple[str, float, str | None]:
            async with self._sem:
                try:
                    v = await self._run_one(index, prompt, response, target)
                    if not math.isfinite(v):
                        raise InfraError(f"returned {v}")
                    return name, v, None
                except RewardTimeout as e:
                    record_metric(f"reward/timeouts/{name}", 1, Reduce.SUM)
                    return name, math.nan, f"timeout: {e}"
                except Exception as e:  # noqa: BLE001 — a broken reward is reported on its item, never a score
                    # the workers' errors already read "<type>: <message>"
                    own = isinstance(e, InfraError) and type(e) is not InfraError
                    msg = str(e) if own else f"{type(e).__name__}: {e}"
                    return name, math.nan, msg

        c = self.combined
        results = await asyncio.gather(*(one(i, n) for i, n in enumerate(c.names)))
        breakdown = {n: v for n, v, _ in results}
        errors = {n: err for n, _, err in results if err is not None}
        for n in errors:
            record_metric(f"reward/errors/{n}", 1, Reduce.SUM)
        if not errors:
            return {"total": c.total(breakdown), "breakdown": breakdown, "errors": {}, "failed": False,
                    "infra_error": None}
        cause = "; ".join(f"reward {n!r}: {err}" for n, err in errors.items())
        record_metric("reward/infra_errors", 1, Reduce.SUM)
        if not self._logged_infra_error:
            self._logged_infra_error = True
            log.error("reward infrastructure failure (the item is marked failed, not scored; later ones are "
                      "counted in reward/infra_errors): %s", cause)
        return {"total": math.nan, "breakdown": breakdown, "errors": errors, "failed": True, "infra_error": cause}

    @staticmethod
    def _record(items: list[dict[str, Any]]) -> None:
        scored = [it for it in items if not it.get("failed")]  # a failed item has no score to average
        keys = list(scored[0]["breakdown"]) + ["total"] if scored else []
        for key in keys:
            for it in scored:
                v = it["total"] if key == "total" else it["breakdown"][key]
                for red in (Reduce.MEAN, Reduce.STD, Reduce.MIN, Reduce.MAX):
                    record_metric(f"reward/{key}/{red.value}", v, red)
        record_metric("reward/count", len(scored), Reduce.SUM)

    # ---- endpoints -------------------------------------------------------------------------
    @endpoint
    async def evaluate_response(self, prompt: str, response: str, target: Any,
                                return_breakdown: bool = False) -> float | dict[str, Any]:
        """The total reward of one response (the full item dict with `return_breakdown=True`).
        Raises `InfraError` when a reward failed (the dict form reports it as `failed` instead)."""
        item = await self._score(prompt, response, target)
        self._record([item])
        if return_breakdown:
            return item
        if item["failed"]:
            raise InfraError(item["infra_error"])
        return item["total"]

    @endpoint
    async def evaluate(self, prompts: Sequence[str], responses: Sequence[str],
                       targets: Sequence[Any], record: bool = True) -> list[dict[str, Any]]:
        """Score a batch: one `{"total", "breakdown", "errors", "failed", "infra_error"}` per item (see
        the module docstring: a failed item has `total` NaN and says why).
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
        if self._workers is not None:
            await self._workers.close()


__all__ = ["RewardActor", "RewardTimeout", "reward_name"]
