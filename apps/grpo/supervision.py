"""The GRPO trainer never waits on producers that cannot deliver.

The training loop waits for a batch from the replay buffer while rollout tasks fill it. That
wait used to poll forever when nothing could come: every rollout task had died of an
exception (kept until the run's end), or every group was filtered for zero reward variance (a
reward that raises or returns a constant, NaN weights). `RolloutSupervisor` watches for each and `wait_for_batch` ends
the wait with the reason:

- a rollout task that raised -> the run ends with that exception;
- `max_consecutive_filtered` groups in a row filtered -> `FilteredGroupsError` with the reason;
- the replay buffer's process died -> its calls raise `ReplicaLostError` naming it (its restart
  policy is 'fail': a restarted buffer would be empty);
- no group added or filtered for `batch_timeout_s` while training waits -> `TimeoutError`;
- every rollout task finished (dataset exhausted) -> None: training ends with what it has.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("forge.grpo")


class FilteredGroupsError(RuntimeError):
    """Too many consecutive groups were dropped by DAPO's zero-variance filter: nothing trains."""


@dataclass
class RolloutSupervisor:
    max_consecutive_filtered: int  # 0: no bound
    batch_timeout_s: float
    tasks: list[asyncio.Task] = field(default_factory=list)
    consecutive_filtered: int = 0
    last_filtered: str = ""
    filtered_error: FilteredGroupsError | None = None  # the first one: every rollout task ends with it
    last_progress: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.max_consecutive_filtered < 0:
            raise ValueError(f"advantage.max_consecutive_filtered must be >= 0 (0: no bound), "
                             f"got {self.max_consecutive_filtered}")
        if not self.batch_timeout_s > 0:
            raise ValueError(f"batch_timeout_s must be > 0, got {self.batch_timeout_s}")

    # ---- what the rollout tasks report ------------------------------------------------------
    def group_added(self) -> None:
        self.consecutive_filtered = 0
        self.last_progress = time.monotonic()

    def group_filtered(self, why: str) -> None:
        """Raises `FilteredGroupsError` (ending the rollout task, hence the run) at the bound.
        Concurrent rollout tasks keep filtering until the run ends; they all raise the first error
        so the run reports the bound, not how far the race got."""
        if self.filtered_error is not None:
            raise self.filtered_error
        self.consecutive_filtered += 1
        self.last_filtered = why
        self.last_progress = time.monotonic()
        n = self.consecutive_filtered
        if self.max_consecutive_filtered and n >= self.max_consecutive_filtered:
            self.filtered_error = FilteredGroupsError(
                f"{n} consecutive groups were filtered out ({why}); nothing is left to train on. "
                "Constant rewards come from a reward that fails or always scores the same, a dataset "
                "without targets, a broken model, or a model that already solves these prompts (every "
                "answer gets the top reward: the data is too easy for it). advantage.max_consecutive_filtered sets this bound "
                "(0: none); advantage.filter_zero_variance: false trains on such groups instead")
            raise self.filtered_error

    # ---- what the training loop asks ---------------------------------------------------------
    def check(self) -> None:
        """Raise why the rollouts can no longer deliver, if they cannot."""
        for t in self.tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                log.error("a rollout task failed; ending the run: %r", t.exception())
                raise t.exception()  # type: ignore[misc]

    def producers_alive(self) -> bool:
        return any(not t.done() for t in self.tasks)



async def wait_for_batch(sup: RolloutSupervisor, sample: Callable[[], Awaitable[Any]],
                         poll_s: float = 0.02) -> Any:
    """The next batch, polled from `sample()`; None when every rollout task has finished (no more
    data) and the buffer cannot make one. Raises when the rollouts can no longer deliver (see
    the module doc), never waits forever."""
    t0 = time.monotonic()
    while True:
        sup.check()
        batch = await sample()  # a dead buffer raises ReplicaLostError (its restart policy is 'fail')
        if batch is not None:
            return batch
        sup.check()
        if not sup.producers_alive():
            return await sample()  # what the last groups completed, if anything
        waited = time.monotonic() - max(t0, sup.last_progress)
        if waited > sup.batch_timeout_s:
            raise TimeoutError(
                f"no rollout group completed for {waited:.0f}s while training waited for a batch "
                f"(batch_timeout_s={sup.batch_timeout_s:g}); {sum(not t.done() for t in sup.tasks)} rollout "
                f"task(s) still running, {sup.consecutive_filtered} consecutive groups filtered")
        await asyncio.sleep(poll_s)
