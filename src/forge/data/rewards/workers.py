"""Reward calls that a timeout actually stops: a small pool of worker processes, one call at a time each.

    workers = RewardWorkers([MathReward(), ThinkingReward()], workers=2, timeout_s=10.0)
    value = await workers.call(0, prompt, response, target)   # reward 0 of the list
    await workers.close()

A thread cannot be killed, and math-verify's own (SIGALRM) timeout works only on a main thread and
turns a timeout into "not equal" (a silent 0.0). Here each call goes to an idle worker; when no
result arrives within `timeout_s` that worker process (only that one: calls on the others go on)
is killed and replaced, and the call raises `RewardTimeout`, an `InfraError`: a hung reward is
an infrastructure failure, never a score. A reward that raises gives `RewardCallError` (also an
`InfraError`) with its type and message; a worker that dies gives an `InfraError` with its exit code.

Rewards are pickled once per worker (built-ins, import paths, module-level functions and classes
pickle; lambdas and closures do not: a clear error at construction). Workers start with the
spawn method (no inherited threads or CUDA state) and load the rewards and math-verify before
the first call, so start-up never counts against a call's timeout.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import pickle
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

from forge.errors import InfraError

# A fresh worker's imports (sympy, via math-verify) can take seconds on a loaded host: bounded apart
# from the calls' own timeout.
START_TIMEOUT_S = 120.0


class RewardTimeout(InfraError):
    """A reward call produced no result within its timeout (and was stopped)."""


class RewardCallError(InfraError):
    """A reward function raised."""


def _worker_main(conn: Connection, payload: bytes) -> None:
    fns = pickle.loads(payload)
    try:  # what MathReward imports on its first symbolic comparison: paid here, not in a call's time
        import math_verify  # noqa: F401
    except ImportError:
        pass
    conn.send(("ready", None))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        index, args = msg
        try:
            conn.send(("ok", float(fns[index](*args))))
        except BaseException as e:  # noqa: BLE001 — reported to the caller as text (it may not pickle)
            conn.send(("error", f"{type(e).__name__}: {e}"))


class _Worker:
    def __init__(self, ctx: Any, payload: bytes):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, payload), name="forge-reward-worker",
                                daemon=True)
        self.proc.start()
        child.close()
        self.ready = False

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()


class RewardWorkers:
    """`workers` processes running the rewards `fns`; `call(i, ...)` runs `fns[i]`, bounded by `timeout_s`."""

    def __init__(self, fns: Sequence[Callable[..., float]], workers: int = 2, timeout_s: float = 10.0):
        if workers < 1:
            raise ValueError(f"reward workers must be >= 1, got {workers}")
        if not timeout_s > 0:
            raise ValueError(f"reward timeout_s must be > 0, got {timeout_s}")
        try:
            self._payload = pickle.dumps(list(fns))
        except Exception as e:  # noqa: BLE001 — any pickling failure means the same thing
            raise ValueError(
                f"rewards run in worker processes (isolation='process') and must pickle: use built-in names, "
                f"import paths 'pkg.mod:fn', module-level functions or classes, not lambdas/closures ({e}); "
                f"or isolation='thread', where a hung reward cannot be stopped") from e
        self.n = workers
        self.timeout_s = timeout_s
        self._ctx = multiprocessing.get_context("spawn")
        self._idle: asyncio.Queue[_Worker] | None = None
        self._all: list[_Worker] = []
        self.killed = 0  # workers killed for a timeout (tests, metrics)

    def _spawn(self) -> _Worker:
        w = _Worker(self._ctx, self._payload)
        self._all.append(w)
        return w

    def _retire(self, w: _Worker) -> _Worker:
        w.kill()
        self._all.remove(w)
        return self._spawn()

    async def call(self, index: int, *args: Any) -> float:
        if self._idle is None:
            self._idle = asyncio.Queue()
            for _ in range(self.n):
                self._idle.put_nowait(self._spawn())
        w = await self._idle.get()  # waiting for a free worker is not part of the call's time
        try:
            if not w.ready:
                if not await asyncio.to_thread(w.conn.poll, START_TIMEOUT_S):
                    raise InfraError(f"a reward worker did not start within {START_TIMEOUT_S:.0f}s")
                w.conn.recv()
                w.ready = True
            w.conn.send((index, args))
            if not await asyncio.to_thread(w.conn.poll, self.timeout_s):
                self.killed += 1
                raise RewardTimeout(f"no result in {self.timeout_s}s (worker process killed)")
            status, value = w.conn.recv()
        except (EOFError, OSError) as e:
            w.proc.join(1)
            code = w.proc.exitcode
            w = self._retire(w)
            raise InfraError(f"reward worker process died (exit code {code}): {type(e).__name__}: {e}") from None
        except BaseException:
            w = self._retire(w)
            raise
        finally:
            if not w.proc.is_alive() or w.conn.closed:
                w = self._retire(w)
            self._idle.put_nowait(w)
        if status == "error":
            raise RewardCallError(value)
        return value

    async def close(self) -> None:
        """Stop every worker (they hold no state worth a graceful exit: SIGKILL, then reap)."""
        for w in self._all:
            w.kill()
        self._all.clear()
        self._idle = None


__all__ = ["RewardCallError", "RewardTimeout", "RewardWorkers"]
